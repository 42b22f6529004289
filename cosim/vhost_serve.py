"""``python -m cosim.vhost_serve``: the simulated card as a vhost-user back-end for your guests.

    python -m cosim.vhost_serve --vfs 1,2 --dir /tmp/offcard     # prints, per VF, e.g.:
    qemu-system-x86_64 -M q35 -accel tcg -m 128M \\
        -object memory-backend-memfd,id=mem,size=128M,share=on -machine memory-backend=mem \\
        -chardev socket,id=vf1,path=/tmp/offcard/vf1.sock -netdev vhost-user,id=n1,chardev=vf1 \\
        -device virtio-net-pci,netdev=n1,disable-legacy=on,vectors=0,mac=02:0f:fc:00:00:01 ...

The card is brought up through the RootComplex (PF and VFs) in the same simulation; each chosen
VF serves one vhost-user socket (``<dir>/vf<n>.sock``), a guest's virtio_net then runs on the
RTL (rings in the guest's own RAM). A network peer on the card's uplink answers ARP and ping at
10.0.0.254; guests are 10.0.0.<n>/24 by convention. A line is printed per guest event. Guest RAM
must be a shared memfd (``share=on``), at most 4 GiB; ``vectors=0`` is needed with QEMU 7.2 under
TCG (MSI-X on the QEMU device crashes it when vhost-user starts).
"""

import argparse
import os
import sys
import threading

from hdl.config import CardConfig
from regmap import VirtioRegs as V
from .card_sim import run_card_bench

MEM_MB = 128


def qemu_command(sock: str, n: int, mem_mb: int = MEM_MB) -> str:
    """A QEMU command line that attaches a guest (your kernel and disk added) to VF ``n``."""
    mac = ":".join(f"{b:02x}" for b in V.MAC_PREFIX + bytes([n]))
    return (f"qemu-system-x86_64 -M q35 -accel tcg -m {mem_mb}M "
            f"-object memory-backend-memfd,id=mem,size={mem_mb}M,share=on "
            f"-machine memory-backend=mem -chardev socket,id=vf{n},path={sock} "
            f"-netdev vhost-user,id=n{n},chardev=vf{n} -device virtio-net-pci,netdev=n{n},"
            f"disable-legacy=on,vectors=0,mac={mac}")


def parse_vfs(text: str, total: int) -> list[int]:
    """``"1,2"`` -> [1, 2]: VF numbers 1..total, no repeats."""
    try:
        vfs = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--vfs {text!r}: a comma-separated list of VF numbers") from None
    if not vfs:
        raise ValueError("--vfs: name at least one VF")
    bad = [v for v in vfs if not 1 <= v <= total]
    if bad:
        raise ValueError(f"--vfs: VF {bad[0]} does not exist (the card has VF1..VF{total})")
    if len(set(vfs)) != len(vfs):
        raise ValueError(f"--vfs {text!r}: a VF named twice")
    return vfs


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m cosim.vhost_serve",
                                 description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--sim", default="verilator", choices=("icarus", "verilator"))
    ap.add_argument("--vfs", default="1", help="VFs to serve, e.g. 1,2 (default 1)")
    ap.add_argument("--dir", default="/tmp/offcard", help="folder of the sockets")
    ap.add_argument("--seconds", type=float, default=3600.0, help="wall seconds to serve")
    ap.add_argument("--waves", action="store_true", help="dump FST waves")
    args = ap.parse_args(argv)
    try:
        vfs = parse_vfs(args.vfs, CardConfig().total_vfs)
    except ValueError as e:
        ap.error(str(e))
    if args.seconds <= 0:
        ap.error("--seconds must be positive")
    sock_dir = os.path.abspath(args.dir)
    try:
        os.makedirs(sock_dir, exist_ok=True)
    except OSError as e:
        ap.error(f"--dir {args.dir}: {e.strerror}")
    for n in vfs:
        print(f"VF{n}: {qemu_command(os.path.join(sock_dir, f'vf{n}.sock'), n)}", flush=True)
    events = os.path.join(sock_dir, "events.log")
    open(events, "w").close()
    env = {"OFFCARD_VHOST_VFS": ",".join(map(str, vfs)), "OFFCARD_VHOST_DIR": sock_dir,
           "OFFCARD_SERVE_S": str(args.seconds), "OFFCARD_VHOST_EVENTS": events}
    print(f"building / starting the simulated card ({args.sim}) ...", flush=True)
    box = {}

    def body():
        try:
            box["res"] = run_card_bench(args.sim, "cosim.workloads.vhost_serve", CardConfig(),
                                        extra_env=env, timeout_s=args.seconds + 900,
                                        waves=args.waves or None)
        except BaseException as e:         # the simulator's log tail, printed below
            box["err"] = e
    th = threading.Thread(target=body, daemon=True)
    th.start()
    # the simulation's event lines (its own output goes to its log file)
    with open(events) as f:
        while th.is_alive():
            line = f.readline()
            if line:
                print(line, end="", flush=True)
            else:
                th.join(0.2)
        sys.stdout.write(f.read())
    if "err" in box:
        print(f"offcard: the simulation ended: {str(box['err']).splitlines()[0]}",
              file=sys.stderr)
        return 1
    return 0 if box["res"].num_failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
