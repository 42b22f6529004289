"""Linux guests on the card's VFs: Debian's kernel in QEMU, its virtio_net's data rings served
by the RTL through our vhost-user back-end (cosim.vhost_card), the card's uplink answered by
a network peer (ARP, ICMP echo)."""

import logging
import os
import re
import socket

import cocotb

from regmap import VirtioRegs as V
from cosim import vhost_user as VU
from cosim.scenarios.dirty import WireWrites
from cosim.scenarios.guest_rig import CardRig, PEER_IP, vf_ip
from cosim.scenarios.linux import (sim_rtts_us, transfer, ping_start, ping_summary, ping_wait,
                                   TrafficAcross, TRANSFER_KIB)
from cosim.scenarios.qemu_migration import (free_port, start_destination, query_migrate,
                                            wait_migration, migrate, retire_source)
from cosim.scenarios.virtio import counters

PING_SIZES = [1, 2, 3, 7, 8, 15, 16, 31, 56, 64, 100, 255, 256, 511, 512, 999, 1000, 1400,
              1471, 1472]


def ping_loop(dst, sizes, wait_s=5):
    """A guest command: one ping of each size to ``dst``; prints one line per ping."""
    sz = " ".join(str(s) for s in sizes)
    return (f"for s in {sz}; do ping -c 1 -W {wait_s} -s $s {dst} >/tmp/p 2>&1; "
            f"r=$?; t=$(grep -o 'time=[0-9.]* ms' /tmp/p); echo \"PING $s $r $t\"; done")


def parse_pings(out):
    """[(size, rc, rtt_ms or None)] from :func:`ping_loop` output."""
    res = []
    for m in re.finditer(r"^PING (\d+) (\d+) ?(?:time=([0-9.]+) ms)?", out, re.M):
        res.append((int(m[1]), int(m[2]), float(m[3]) if m[3] else None))
    return res


class LogCount(logging.Handler):
    """Counts the ERROR records of a logger (the vhost-user server's one line per refusal)."""

    def __init__(self, name):
        super().__init__(logging.ERROR)
        self.lines = []
        logging.getLogger(name).addHandler(self)

    def emit(self, record):
        self.lines.append(record.getMessage())


def malformed_cases():
    """(name, messages [(bytes, fds)]) of front-ends that go wrong; each must close its
    connection with one log line before the bad message changes anything."""
    def msg(req, payload=b"", flags=VU.VERSION):
        return VU.encode(req, payload, flags)
    mfd = os.memfd_create("offcard-bad-guest")
    os.ftruncate(mfd, 1 << 20)
    table = VU.pack_mem_table([VU.MemRegionDesc(0, 1 << 20, 0x7F00_0000_0000, 0)])
    return [
        ("bad size", [(msg(VU.Req.SET_FEATURES, b"\0" * 4), [])]),
        ("unknown request", [(msg(999, b""), [])]),
        ("fd missing", [(msg(VU.Req.SET_OWNER), []),
                        (msg(VU.Req.SET_VRING_KICK, (0).to_bytes(8, "little")), [])]),
        ("ring outside the memory table",
         [(msg(VU.Req.SET_OWNER), []), (msg(VU.Req.SET_MEM_TABLE, table), [mfd]),
          (msg(VU.Req.SET_VRING_NUM, VU.VringState(0, 256).pack()), []),
          (msg(VU.Req.SET_VRING_ADDR, VU.VringAddr(0, 0, 0x7F00_0020_0000, 0x7F00_0020_1000,
                                                   0x7F00_0020_2000).pack()), [])]),
    ], mfd


async def front_end_goes_wrong(rig, n, name, messages):
    """Play ``messages`` to VF ``n``'s socket and wait until the back-end hangs up."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(rig.socket_path(n)))
    for data, fds in messages:
        socket.send_fds(sock, [data], fds) if fds else sock.sendall(data)
    sock.setblocking(False)
    closed = []

    def hung_up():
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return False
        closed.append(data)
        return data == b""
    await rig.pump.until(hung_up, 30, f"the back-end closing a front-end with {name}")
    sock.close()


@cocotb.test()
async def test_guest_pings_uplink_peer(dut):
    """One Linux guest on VF1: virtio_net probes on the card, eth0 comes up, 20 pings of 1 to
    1472 bytes to the peer on the uplink get 20 replies. Then front-ends that go wrong on VF2's
    socket (a bad size, an unknown request, a missing fd, a ring outside the memory table):
    each connection is closed with one log line, VF2 is never brought up, the guest on VF1
    goes on pinging."""
    rig = await CardRig(dut, [1, 2]).start()
    try:
        g = await rig.boot(1)
        rc, out = await rig.run(1, "cat /sys/class/net/eth0/device/driver/module/drivers/*"
                                   " 2>/dev/null; ls /sys/bus/virtio/drivers/virtio_net")
        assert rc == 0, out
        t0 = rig.h.cycles()
        mark = len(rig.card.backends[1].trace)
        rc, out = await rig.run(1, ping_loop(PEER_IP, PING_SIZES), timeout_s=300)
        dut._log.info("simulated RTTs (us, notify to receive interrupt) %s",
                      [round(x, 2) for x in sim_rtts_us(rig.card.backends[1].trace[mark:])])
        pings = parse_pings(out)
        assert [p[0] for p in pings] == PING_SIZES, out
        lost = [p for p in pings if p[1] != 0]
        assert not lost, f"pings without a reply: {lost}\n{out}"
        ctr = await counters(rig.h)
        dut._log.info("guest boot %.1f s; 20 pings in %d cycles; RTTs (guest, ms) %s; %s",
                      g.boot_s, rig.h.cycles() - t0, [p[2] for p in pings], ctr)
        assert rig.peer.stats.echo_replies >= 20
        # the guest's driver unbound and bound again: QEMU stops the rings (GET_VRING_BASE,
        # answered by stopping the VF on the card and reading its indices) and starts them
        # again on a reset device
        be1 = rig.card.backends[1]
        events = len(rig.events)
        rc, out = await rig.run(1, "d=$(basename $(readlink /sys/class/net/eth0/device)); "
                                   "echo -n $d > /sys/bus/virtio/drivers/virtio_net/unbind; "
                                   "sleep 1; echo -n $d > /sys/bus/virtio/drivers/virtio_net/bind; "
                                   "sleep 1; ip link set eth0 up; "
                                   f"ip addr add {vf_ip(1)}/24 dev eth0; sleep 2; "
                                   f"ping -c 3 -W 5 {PEER_IP}", timeout_s=120)
        assert rc == 0 and " 0% packet loss" in out, out
        new = [t for _, t in rig.events[events:]]
        assert sum("stopped at avail index" in t for t in new) == 2, new
        assert sum("rings up" in t for t in new) == 1 and be1.live, new
        errors = LogCount("cosim.vhost_user")
        cases, mfd = malformed_cases()
        for name, messages in cases:
            before = len(errors.lines)
            await front_end_goes_wrong(rig, 2, name, messages)
            assert len(errors.lines) == before + 1, (name, errors.lines[before:])
            dut._log.info("front-end with %s: %s", name, errors.lines[-1])
        os.close(mfd)
        await rig.pump.until(lambda: rig.card.idle, 30, "the card's jobs done")
        assert await rig.card.backends[2].drv.read_status() == 0
        assert rig.card.backends[2].mapped == []
        rc, out = await rig.run(1, f"ping -c 3 -W 5 {PEER_IP}", timeout_s=120)
        assert " 0% packet loss" in out, out
    finally:
        rig.close()


async def guest_features(rig, n):
    """The virtio feature bits the guest's driver negotiated (sysfs), as an int."""
    rc, out = await rig.run(n, "cat /sys/bus/virtio/devices/virtio*/features")
    assert rc == 0, out
    bits = out.strip().splitlines()[-1]
    return sum(1 << i for i, c in enumerate(bits) if c == "1")


async def tcp_csum_errors(rig, n):
    """The guest kernel's count of TCP segments that failed its checksum check."""
    rc, out = await rig.run(n, "grep Tcp: /proc/net/snmp")
    assert rc == 0, out
    names, values = (line.split()[1:] for line in out.strip().splitlines()[-2:])
    return int(dict(zip(names, values))["InCsumErrors"])


@cocotb.test()
async def test_two_guests(dut):
    """Two Linux guests on VF1 and VF2 ping each other through the card's switch (ARP by the
    switch's broadcast flood) and move 256 KiB over TCP byte exact (md5 in both guests), with
    MRG_RXBUF and both checksum offloads (the card fills in the sender's TCP checksums and
    gives the receiver DATA_VALID; the receiving kernel counts no checksum error); QEMU killed
    in mid-transfer resets VF1 only while VF2 goes on pinging the peer; a new QEMU on VF1's
    socket, without MRG_RXBUF and without the checksum offloads, takes a 256 KiB transfer from
    VF2 (whose checksums the card still fills in; VF1's kernel checks them itself)."""
    rig = await CardRig(dut, [1, 2]).start()
    try:
        await rig.boot(1)
        await rig.boot(2)
        for a, b in ((1, 2), (2, 1)):
            rc, out = await rig.run(a, f"ping -c 3 -W 5 {vf_ip(b)}", timeout_s=120)
            assert rc == 0 and " 0% packet loss" in out, out
        for n in (1, 2):
            for bit in (V.F_NET_MRG_RXBUF, V.F_NET_CSUM, V.F_NET_GUEST_CSUM):
                assert await guest_features(rig, n) >> bit & 1, (n, bit)
                assert rig.card.backends[n].drv.features >> bit & 1, (n, bit)
        ctr_a = await counters(rig.h)
        s, d, size, wall, cyc = await transfer(rig, 1, 2)
        assert size == TRANSFER_KIB * 1024 and s == d, (s, d, size)
        dut._log.info("VF1 -> VF2 %d KiB with MRG_RXBUF and checksum offload: %.1f s wall, "
                      "%d cycles", TRANSFER_KIB, wall, cyc)
        ctr0 = await counters(rig.h)
        assert ctr0["DROP_BAD"] == 0 and ctr0["DROP_SIZE"] == 0, ctr0
        filled = ctr0["CSUM_FILLED"] - ctr_a["CSUM_FILLED"]
        valid = ctr0["CSUM_VALID"] - ctr_a["CSUM_VALID"]
        # (about 180 full segments one way, their ACKs the other: every one filled and valid)
        assert filled >= 180 and valid >= 180, (ctr_a, ctr0)
        assert ctr0["CSUM_BAD"] == ctr_a["CSUM_BAD"] and ctr0["DROP_CSUM"] == 0, (ctr_a, ctr0)
        for n in (1, 2):
            assert await tcp_csum_errors(rig, n) == 0
        # QEMU on VF1 killed in mid-transfer
        await rig.run(2, "rm -f /tmp/rx; (sleep 900 | nc -l -p 5001 > /tmp/rx 2>/dev/null &); "
                         "sleep 0.3")
        g1 = rig.guests[1]
        g1.send(f"dd if=/dev/zero bs=1024 count=4096 2>/dev/null | nc {vf_ip(2)} 5001", 120)
        before = rig.h.bridge.tlps_in
        await rig.pump.until(lambda: rig.h.bridge.tlps_in > before + 400, 120,
                             "the transfer from VF1 under way")
        rig.kill(1)
        be1 = rig.card.backends[1]
        await rig.pump.until(lambda: not be1.live and rig.card.idle and be1.memory is None,
                             60, "VF1 reset after its QEMU was killed")
        status = await be1.drv.read_status()
        assert status == 0, f"VF1 status {status:#x} after its front-end went away"
        assert await rig.card.backends[2].drv.read_status() & V.S_DRIVER_OK
        rc, out = await rig.run(2, f"killall nc; ping -c 5 -W 5 {PEER_IP}", timeout_s=120)
        assert " 0% packet loss" in out, out
        # (what VF1's ring had under way when its memory went away may have ended in
        # NEEDS_RESET, since cleared by the reset; nothing of that after this point)
        ctr1 = await counters(rig.h)
        # a new QEMU on the same socket, without MRG_RXBUF
        await rig.boot(1, nic_opts=["mrg_rxbuf=off", "csum=off", "guest_csum=off"])
        for bit in (V.F_NET_MRG_RXBUF, V.F_NET_CSUM, V.F_NET_GUEST_CSUM):
            assert not await guest_features(rig, 1) >> bit & 1, bit
            assert not rig.card.backends[1].drv.features >> bit & 1, bit
        s, d, size, wall, cyc = await transfer(rig, 2, 1, port=5002)
        assert size == TRANSFER_KIB * 1024 and s == d, (s, d, size)
        dut._log.info("VF2 -> VF1 %d KiB without MRG_RXBUF, VF1 without checksum offload: "
                      "%.1f s wall, %d cycles", TRANSFER_KIB, wall, cyc)
        assert await tcp_csum_errors(rig, 1) == 0
        ctr = await counters(rig.h)
        dut._log.info("counters %s (before the kill %s)", ctr, ctr0)
        assert ctr["DROP_BAD"] == ctr1["DROP_BAD"] and ctr["DROP_SIZE"] == 0, (ctr1, ctr)
    finally:
        rig.close()


@cocotb.test()
async def test_qemu_live_migration(dut):
    """QEMU migrates a running Linux guest from the QEMU on VF1's socket to one started with
    ``-incoming`` on VF2's socket, while the guest pings the uplink peer every 100 ms and sends
    256 KiB over TCP to a guest on VF3 (byte exact across the switch-over). The
    source back-end negotiates LOG_SHMFD and LOG_ALL, the card marks QEMU's dirty log for VF1
    (every page VF1 writes on the wire while the log is on is marked; the extra pages are the
    byte's neighbours); at switch-over GET_VRING_BASE stops VF1 and VF2 resumes from the
    indices QEMU migrated; the switch moves the guest's MAC to VF2. The guest's pings go on
    through VF2, VF1 is free once the source QEMU quits. Then back to VF1: a destination QEMU
    killed in mid-migration leaves the guest running on VF2 (migration failed, the card's log
    off again, pings answered), and the next attempt moves it to VF1."""
    rig = await CardRig(dut, [1, 2, 3]).start()
    try:
        await rig.boot(1, qmp=True)
        await rig.boot(3)                                     # the transfer's receiver
        wire = WireWrites(rig.h)
        be1, be2 = rig.card.backends[1], rig.card.backends[2]
        rc, out = await rig.run(1, f"ping -c 3 -W 5 {PEER_IP}", timeout_s=120)
        assert rc == 0 and " 0% packet loss" in out, out
        # pings, and 256 KiB over TCP to the guest on VF3, running across the switch-over
        traffic = await TrafficAcross(rig, 1, rig, 3, PEER_IP, count=200).start()
        await migrate(dut._log, rig, 1, 2, wire)
        kicks = sum(be2.kicks.values())
        await traffic.finish(dut._log, rig, 2, "VF1 -> VF2")
        assert sum(be2.kicks.values()) > kicks, "the guest's traffic did not go through VF2"
        await retire_source(rig, 1)
        # back to VF1, the first destination killed in mid-migration
        await start_destination(rig, 1, 2, port := free_port())
        await rig.qmp(2, "migrate-set-parameters", **{"max-bandwidth": 200_000})
        await rig.qmp(2, "migrate", uri=f"tcp:127.0.0.1:{port}")
        await rig.pump.until(lambda: 2 in rig.card.dirty.logs, 60, "the card logging VF2")
        status = await query_migrate(rig, 2)
        assert status["status"] in ("setup", "active"), status     # (logging starts in setup)
        rig.kill(1)                                           # the destination dies
        status = await wait_migration(rig, 2)
        assert status["status"] == "failed", status
        await rig.pump.until(lambda: 2 not in rig.card.dirty.logs and rig.card.idle, 60,
                             "the card's log for VF2 off after the failed migration")
        assert be2.live
        rc, out = await rig.run(2, f"ping -c 5 -W 5 {PEER_IP}", timeout_s=120)
        assert rc == 0 and " 0% packet loss" in out, f"the guest on VF2 after the failure: {out}"
        await rig.pump.until(lambda: be1.memory is None and rig.card.idle, 60,
                             "VF1 released after the killed destination")
        rc, out = await rig.run(2, ping_start(PEER_IP, 80, 0.1))
        assert rc == 0, out
        await migrate(dut._log, rig, 2, 1, wire)
        rc, out = await rig.run(1, ping_wait(8 + 30), timeout_s=8 + 90)
        sent, got, _ = ping_summary(out)
        dut._log.info("pings across the migration back: %d sent, %d answered", sent, got)
        assert sent == 80 and got >= 60, f"pings across the migration back: {out}"
        rc, out = await rig.run(1, f"ping -c 5 -W 5 {PEER_IP}", timeout_s=120)
        assert rc == 0 and " 0% packet loss" in out, f"the guest back on VF1: {out}"
        await retire_source(rig, 2)
    finally:
        rig.close()
