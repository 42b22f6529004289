"""``python -m cosim.guest build|boot``: build the guest image, or boot it.

``boot`` without ``--run`` gives an interactive busybox shell on this terminal (``poweroff -f``
or ``Ctrl-A x`` ends it); with ``--run CMD`` (repeatable) it boots through :class:`Guest`, runs
the commands, prints their output and powers off (exit status 1 if one failed).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from .image import ImageError, default_cache_dir, ensure_image
from .qemu import (DEFAULT_MAC, DEFAULT_MEM_MB, Guest, GuestError, qemu_args, user_net,
                   vhost_user_net)

SLIRP_IP = "10.0.2.15/24"
SLIRP_GW = "10.0.2.2"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cosim.guest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None,
                        help=f"image cache folder (default {default_cache_dir()}, "
                             "or $OFFCARD_GUEST_DIR)")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the guest image if missing or stale")
    build.add_argument("--rebuild", action="store_true", help="build even if up to date")
    build.add_argument("--kernel-package", default=None,
                       help="kernel package (default: what linux-image-amd64 depends on)")
    boot = sub.add_parser("boot", help="boot the guest (a shell here, or --run commands)")
    net = boot.add_mutually_exclusive_group()
    net.add_argument("--user-net", action="store_true",
                     help=f"QEMU user networking (guest {SLIRP_IP}, gateway {SLIRP_GW})")
    net.add_argument("--vhost-user", metavar="SOCKET",
                     help="vhost-user netdev: the back-end listens on SOCKET")
    boot.add_argument("--mac", default=DEFAULT_MAC, help=f"NIC MAC (default {DEFAULT_MAC})")
    boot.add_argument("--ip", default=None,
                      help=f"eth0 address ADDR/PREFIX (default {SLIRP_IP} with --user-net)")
    boot.add_argument("--gw", default=None, help="default route via this address")
    boot.add_argument("--mem", type=int, default=DEFAULT_MEM_MB, help="guest RAM in MiB")
    boot.add_argument("--run", action="append", metavar="CMD",
                      help="run CMD (repeatable) instead of a shell, then power off")
    boot.add_argument("--timeout", type=float, default=60.0,
                      help="seconds for the boot and for each command (default 60)")
    return parser


def _boot(args, image) -> int:
    if args.user_net:
        netdev, ip, gw = user_net(), args.ip or SLIRP_IP, args.gw or SLIRP_GW
    elif args.vhost_user:
        netdev, ip, gw = vhost_user_net(args.vhost_user), args.ip, args.gw
    else:
        netdev, ip, gw = None, args.ip, args.gw
    kwargs = dict(mem_mb=args.mem, netdev_args=netdev, mac=args.mac, ip=ip, gw=gw)
    if not args.run:
        argv = qemu_args(image, console="terminal", shell=True, **kwargs)
        print("guest: a shell on this terminal; 'poweroff -f' or Ctrl-A x ends it",
              file=sys.stderr)
        return subprocess.run(argv).returncode
    start = time.monotonic()
    with Guest.start(image, boot_timeout=args.timeout, **kwargs) as guest:
        ready = guest.wait_ready()
        print(f"guest: ready after {time.monotonic() - start:.1f} s: {ready.ifname} "
              f"{ready.mac} {ready.ip}")
        status = 0
        for cmd in args.run:
            rc, output = guest.run(cmd, timeout=args.timeout)
            print(f"guest$ {cmd}\n{output}", end="" if output.endswith("\n") else "\n")
            print(f"guest: exit status {rc}")
            status = status or (rc != 0)
        guest.poweroff()
        print(f"guest: powered off after {time.monotonic() - start:.1f} s")
    return status


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        image = ensure_image(args.dir, **({"rebuild": args.rebuild,
                                           "kernel_package": args.kernel_package}
                                          if args.command == "build" else {}),
                             log=lambda line: print(line, file=sys.stderr))
        if args.command == "build":
            print(f"kernel {image.kernel_version}: {image.kernel} "
                  f"({image.kernel.stat().st_size >> 10} KiB), {image.initramfs} "
                  f"({image.initramfs.stat().st_size >> 10} KiB)")
            return 0
        return _boot(args, image)
    except (ImageError, GuestError) as exc:
        print(f"python -m cosim.guest {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
