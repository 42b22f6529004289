"""The Linux guest (cosim.guest): the initramfs pieces without QEMU, then one boot under QEMU
with user networking (virtio-net-pci as for vhost-user: modern only, ``vectors=0``).

The boot tests share one guest (about 10 s of wall time); ``make install`` installs
``qemu-system-x86_64`` and ``/bin/busybox``, and without them these tests fail (saying so).
"""

import functools
import gzip
import os
import select
import shutil
import stat
import subprocess
import time
import pytest
from cosim.guest import image as guest_image
from cosim.guest.image import (INIT_SCRIPT, MODULES, GuestImage, ImageError, NewcWriter,
                               build_initramfs, ensure_image, is_static_elf64, module_depends,
                               read_newc)
from cosim.guest.qemu import (ConsoleParser, Guest, GuestError, kernel_cmdline, qemu_args, user_net,
                              vhost_user_net)
from pathlib import Path

BUSYBOX = shutil.which("busybox") or ("/bin/busybox" if os.path.exists("/bin/busybox") else None)
MAC = "52:54:00:0f:ca:42"
SLIRP_IP = "10.0.2.15/24"
SLIRP_GW = "10.0.2.2"

def needs_busybox(test):
    """The host's busybox runs the init script's loop (``make install`` installs it)."""
    @functools.wraps(test)
    def wrapped(*a, **kw):
        assert BUSYBOX is not None, "busybox missing: apt-get install busybox-static"
        return test(*a, **kw)
    return wrapped


# --- the cpio writer and the initramfs ------------------------------------------------------


def test_newc_writer_round_trip():
    cpio = NewcWriter()
    cpio.add_dir("bin")
    cpio.add_file("bin/odd", b"12345", 0o755)  # 5 bytes: data padding
    cpio.add_file("bin/empty", b"")
    cpio.add_symlink("bin/sh", "busybox")
    cpio.add_node("dev/console", stat.S_IFCHR | 0o600, 5, 1)
    archive = cpio.finish()
    assert archive.startswith(b"070701") and len(archive) % 4 == 0
    assert b"TRAILER!!!\0" in archive
    entries = {entry.name: entry for entry in read_newc(archive)}
    assert list(entries) == ["bin", "bin/odd", "bin/empty", "bin/sh", "dev/console"]
    assert stat.S_ISDIR(entries["bin"].mode)
    assert entries["bin/odd"].data == b"12345" and stat.S_IMODE(entries["bin/odd"].mode) == 0o755
    assert entries["bin/empty"].data == b""
    assert stat.S_ISLNK(entries["bin/sh"].mode) and entries["bin/sh"].data == b"busybox"
    assert stat.S_ISCHR(entries["dev/console"].mode) and entries["dev/console"].rdev == (5, 1)
    with pytest.raises(ValueError):
        cpio.add_dir("late")
    with pytest.raises(ValueError):
        NewcWriter().add_dir("/absolute")


@needs_busybox
def test_newc_archive_reads_with_busybox_cpio():
    cpio = NewcWriter()
    cpio.add_dir("d")
    cpio.add_file("d/f", b"abc")
    cpio.add_symlink("d/l", "f")
    listing = subprocess.run([BUSYBOX, "cpio", "-t"], input=cpio.finish(), capture_output=True,
                             check=True).stdout.decode().split()
    assert listing == ["d", "d/f", "d/l"]


def test_initramfs_layout_and_determinism():
    modules = {name: f"ko:{name}".encode() for name in MODULES if name != "failover"}
    args = (b"\x7fELF-busybox", ["busybox", "sh", "ip"], "6.1.0-0-amd64", modules,
            INIT_SCRIPT.read_bytes())
    blob = build_initramfs(*args)
    assert blob == build_initramfs(*args)  # no time stamps inside
    entries = {entry.name: entry for entry in read_newc(gzip.decompress(blob))}
    init = entries["init"]
    assert init.data == INIT_SCRIPT.read_bytes() and stat.S_IMODE(init.mode) == 0o755
    assert entries["dev/console"].rdev == (5, 1)
    assert entries["bin/sh"].data == b"busybox" and "bin/ip" in entries
    assert "bin/busybox" in entries and stat.S_ISREG(entries["bin/busybox"].mode)
    assert entries["sbin"].data == b"bin"
    order = entries["etc/offcard/modules"].data.decode().split()
    assert order == [name for name in MODULES if name != "failover"]  # built-ins left out
    assert entries["lib/modules/virtio_net.ko"].data == b"ko:virtio_net"


def test_module_order_check():
    assert module_depends(b"xx\0depends=virtio_ring,virtio\0vermagic=6.1\0") == \
        ["virtio_ring", "virtio"]
    assert module_depends(b"\0depends=\0") == []
    good = {name: b"\0depends=\0" for name in MODULES}
    good["virtio_net"] = b"\0depends=virtio_ring,virtio,net_failover\0"
    guest_image._check_module_order(good, set())
    bad = dict(good, virtio_ring=b"\0depends=virtio_net\0")
    with pytest.raises(ImageError, match="virtio_ring depends on virtio_net"):
        guest_image._check_module_order(bad, set())


def test_static_elf_check():
    if BUSYBOX is not None and os.path.realpath(BUSYBOX) == "/bin/busybox":
        assert is_static_elf64(open("/bin/busybox", "rb").read(1 << 16))
    assert not is_static_elf64(open("/bin/sh", "rb").read(1 << 16))  # dynamic
    assert not is_static_elf64(b"#!/bin/sh\n")


def test_ensure_image_builds_only_when_stale(tmp_path, monkeypatch):
    built = []

    def fake_build(cache, package, log):
        built.append(package)
        for name in (guest_image.KERNEL_NAME, guest_image.INITRAMFS_NAME):
            (cache / name).write_bytes(b"x")
        stamp = {**guest_image._wanted_stamp(), "kernel_package": "linux-image-x",
                 "kernel_version": "x"}
        (cache / guest_image.STAMP_NAME).write_text(guest_image.json.dumps(stamp))
        return guest_image._image(cache, stamp)

    monkeypatch.setattr(guest_image, "_build", fake_build)
    monkeypatch.setenv("OFFCARD_GUEST_DIR", str(tmp_path / "env"))
    first = ensure_image()
    assert first.kernel == tmp_path / "env" / "vmlinuz" and built == [None]
    assert ensure_image() == first and built == [None]  # cached
    init = tmp_path / "init.sh"
    init.write_text("#!/bin/sh\necho changed\n")
    monkeypatch.setattr(guest_image, "INIT_SCRIPT", init)
    ensure_image()
    assert built == [None, None]  # the init script changed: rebuilt
    ensure_image(kernel_package="linux-image-y")
    assert built[-1] == "linux-image-y"


# --- the console protocol -------------------------------------------------------------------


def test_console_parser_in_small_chunks():
    lines = [
        "[    1.9] Run /init as init process",
        "OFFCARD-ERROR insmod failover failed",
        "OFFCARD-READY eth0 52:54:00:0f:ca:42 10.0.2.15/24",
        "OFFCARD-CMD t1 ZWNobyBoaQ== 0",  # an echoed command line is no output
        "OFFCARD-BEGIN t1",
        "h\u00e9llo",
        "OFFCARD-DONE t0 0 1",  # another token: output
        "OFFCARD-DONE t1 3 0",
        "OFFCARD-BEGIN t2",
        "OFFCARD-DONE t2 0 1",
    ]
    data = "".join(f"{line}\r\n" for line in lines).encode()
    parser = ConsoleParser()
    for i in range(0, len(data), 3):  # splits the \r\n pairs and the UTF-8 of é
        parser.feed(data[i:i + 3])
    assert parser.ready.ifname == "eth0" and parser.ready.mac == "52:54:00:0f:ca:42"
    assert parser.ready.ip == "10.0.2.15/24"
    assert parser.errors == ["insmod failover failed"]
    assert parser.results == {"t1": (3, "h\u00e9llo\nOFFCARD-DONE t0 0 1"), "t2": (0, "")}
    assert parser.log.splitlines() == lines

    parser = ConsoleParser()
    parser.feed(b"OFFCARD-READY - - -\n")
    assert (parser.ready.ifname, parser.ready.mac, parser.ready.ip) == (None, None, None)


def test_command_line_encoding():
    line = ConsoleParser.command_line("a.1", "echo 'x y'\nexit 2", timeout=2.5)
    head, token, encoded, secs = line.decode().split()
    assert (head, token, secs) == ("OFFCARD-CMD", "a.1", "3")
    with pytest.raises(ValueError):
        ConsoleParser.command_line("bad token", "true")
    with pytest.raises(ValueError):
        ConsoleParser.command_line("t", "x" * 4000)


@needs_busybox
def test_init_script_syntax():
    subprocess.run([BUSYBOX, "sh", "-n", str(INIT_SCRIPT)], check=True)


@needs_busybox
def test_init_command_loop_on_the_host(tmp_path):
    """The guest's command loop (init.sh's ``serve``) on the host's busybox sh, parsed by the
    same ConsoleParser the Guest uses."""
    commands = {
        "plain": ("echo one; echo two", None),
        "nonl": ("printf 'no newline'", None),
        "status": ("echo err >&2; exit 7", None),
        "multi": ("x='a b'\nfor w in $x; do echo \"<$w>\"; done", None),
        "empty": ("true", None),
        "killed": ("sleep 5; echo never", 1),
    }
    feed = b"junk line\n" + b"".join(ConsoleParser.command_line(token, cmd, timeout)
                                     for token, (cmd, timeout) in commands.items())
    feed += b"OFFCARD-CMD bad !!!notbase64 0\n"
    env = {"OFFCARD_INIT_SELFTEST": "1", "OFFCARD_WORK": str(tmp_path), "PATH": "/bin:/usr/bin"}
    start = time.monotonic()
    proc = subprocess.run([BUSYBOX, "sh", str(INIT_SCRIPT)], input=feed, capture_output=True,
                          env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 4.5  # the sleep 5 was killed after 1 s
    parser = ConsoleParser()
    parser.feed(proc.stdout)
    assert parser.results["plain"] == (0, "one\ntwo\n")
    assert parser.results["nonl"] == (0, "no newline")
    assert parser.results["status"] == (7, "err\n")
    assert parser.results["multi"] == (0, "<a>\n<b>\n")
    assert parser.results["empty"] == (0, "")
    assert parser.results["killed"][0] == 137 and "never" not in parser.results["killed"][1]
    assert parser.results["bad"][0] == 255


def test_qemu_args():
    image = GuestImage(Path("/k/vmlinuz"), Path("/k/initrd.gz"), "v", "p")
    args = qemu_args(image, mem_mb=96, netdev_args=vhost_user_net("/run/vu.sock"), mac=MAC,
                     ip="10.0.0.1/24", peer="10.0.0.2", qmp_path="/run/qmp.sock")
    joined = " ".join(args)
    assert "memory-backend-memfd,id=mem,size=96M,share=on" in joined
    assert "-m 96M" in joined and "memory-backend=mem" in joined
    assert "socket,id=n0c,path=/run/vu.sock" in joined and "vhost-user,id=n0,chardev=n0c" in joined
    device = args[args.index("-device") + 1]
    assert device.startswith("virtio-net-pci,netdev=n0,") and f"mac={MAC}" in device
    assert "disable-legacy=on" in device and "vectors=0" in device
    cmdline = args[args.index("-append") + 1]
    assert cmdline == kernel_cmdline(ip="10.0.0.1/24", peer="10.0.0.2")
    assert "console=ttyS0" in cmdline and "offcard.peer=10.0.0.2" in cmdline
    assert "unix:/run/qmp.sock,server=on,wait=off" in joined
    with pytest.raises(ValueError, match="memfd"):
        qemu_args(image, memfd=False, netdev_args=vhost_user_net("/s"))
    assert "-device" not in qemu_args(image)  # no netdev, no NIC
    assert "memory-backend-memfd" not in " ".join(qemu_args(image, memfd=False,
                                                            netdev_args=user_net()))


# --- one boot under QEMU --------------------------------------------------------------------


@pytest.fixture(scope="module")
def guest():
    assert shutil.which("qemu-system-x86_64"), \
        "qemu-system-x86_64 missing: apt-get install qemu-system-x86 (make install does)"
    assert os.path.exists("/bin/busybox"), "/bin/busybox missing: apt-get install busybox-static"
    image = ensure_image()
    with Guest.start(image, netdev_args=user_net(), mac=MAC, ip=SLIRP_IP, peer=SLIRP_GW,
                     qmp=True, boot_timeout=90) as running:
        running.wait_ready()
        yield running


def test_guest_ready_with_our_mac(guest):
    assert (guest.ready.ifname, guest.ready.mac, guest.ready.ip) == ("eth0", MAC, SLIRP_IP)
    assert guest.errors == []
    assert guest.ready.at < 60, f"boot took {guest.ready.at:.1f} s"


def test_virtio_net_probed_and_eth0_up(guest):
    driver = guest.check("basename $(readlink /sys/class/net/eth0/device/driver)")
    assert driver == "virtio_net\n"
    assert guest.check("cat /sys/class/net/eth0/address") == f"{MAC}\n"
    assert guest.check("cat /sys/class/net/eth0/operstate") == "up\n"
    assert f"inet {SLIRP_IP}" in guest.check("ip addr show eth0")
    # modern-only virtio-pci (disable-legacy=on): the transport is virtio_pci
    assert guest.check("basename $(readlink /sys/bus/virtio/devices/virtio0/../driver)") \
        == "virtio-pci\n"


def test_run_output_and_status(guest):
    assert guest.run("echo out; echo err >&2; exit 5") == (5, "out\nerr\n")
    assert guest.run("printf 'no newline'") == (0, "no newline")
    assert guest.run("echo $OFFCARD_PEER") == (0, f"{SLIRP_GW}\n")
    with pytest.raises(GuestError, match="killed after its 1 s timeout"):
        guest.run("sleep 30", timeout=1)
    assert guest.run("echo still serving") == (0, "still serving\n")


def test_non_blocking_interface(guest):
    tokens = [guest.send(f"echo {i}") for i in range(3)]
    deadline = time.monotonic() + 30
    while not all(guest.poll(token) for token in tokens):
        assert time.monotonic() < deadline, guest.log[-500:]
        select.select([guest.fileno()], [], [], 0.5)
        guest.on_readable()
    assert [guest.poll(token) for token in tokens] == [(0, f"{i}\n") for i in range(3)]


def test_ping_slirp_gateway(guest):
    rc, output = guest.run(f"ping -c 3 -W 2 {SLIRP_GW}", timeout=20)
    assert rc == 0, output
    assert "3 packets transmitted, 3 packets received" in output


def test_qmp(guest):
    assert guest.qmp("query-status")["status"] == "running"


def test_poweroff(guest):
    guest.poweroff(timeout=30)
    assert guest.returncode == 0
    assert "reboot: Power down" in guest.log
