"""Linux guests on the card's VFs: Debian's kernel in QEMU, its virtio_net's data rings served
by the RTL through our vhost-user back-end (cosim.vhost_card), the card's uplink answered by
a network peer (ARP, ICMP echo)."""

import os
import re

import cocotb

from hdl.params import NetRegs
from cosim.guest_rig import CardRig, PEER_IP, vf_ip

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


async def counters(h):
    return {n: await h.drv.mgmt_read(getattr(NetRegs, n)) for n in
            ("TX_FRAMES", "RX_FRAMES", "UPLINK_OUT", "UPLINK_IN", "DROP_NOBUF", "DROP_BAD",
             "DROP_UNKNOWN", "DROP_SIZE")}


@cocotb.test()
async def test_guest_pings_uplink_peer(dut):
    """One Linux guest on VF1: virtio_net probes on the card, eth0 comes up, 20 pings of 1 to
    1472 bytes to the peer on the uplink get 20 replies."""
    rig = await CardRig(dut, [1]).start()
    try:
        g = await rig.boot(1)
        rc, out = await rig.run(1, "cat /sys/class/net/eth0/device/driver/module/drivers/*"
                                   " 2>/dev/null; ls /sys/bus/virtio/drivers/virtio_net")
        assert rc == 0, out
        t0 = rig.h.cycles()
        rc, out = await rig.run(1, ping_loop(PEER_IP, PING_SIZES), timeout_s=300)
        pings = parse_pings(out)
        assert [p[0] for p in pings] == PING_SIZES, out
        lost = [p for p in pings if p[1] != 0]
        assert not lost, f"pings without a reply: {lost}\n{out}"
        ctr = await counters(rig.h)
        dut._log.info("guest boot %.1f s; 20 pings in %d cycles; RTTs (guest, ms) %s; %s",
                      g.boot_s, rig.h.cycles() - t0, [p[2] for p in pings], ctr)
        assert rig.peer.stats.echo_replies >= 20
    finally:
        rig.close()
