"""Two cards in one simulation (``cosim.twin``), each on its own cocotbext-pcie RootComplex
with its own host memory: two servers. Enumeration and PF BAR2 state per card, virtio-net on
both at once, and frames from one card's uplink into the other's, as a network between the
servers would carry them (the base of the live-migration bench)."""

import random

import cocotb
from cocotb.triggers import ClockCycles

from cocotbext.pcie.core.utils import PcieId

from regmap import MigRegs as MG, NetRegs
from host_driver.offcard import VENDOR_ID, DEVICE_ID
from cosim.harness import CardHarness, start_twin
from cosim.uplink import Uplink
from cosim.scenarios.virtio import net, frame, receive_n, mac_of, diff

UNKNOWN = bytes.fromhex("020000000099")     # a unicast MAC no function of either card owns


async def both(*coros):
    """Run ``coros`` at the same time (the two servers do not wait for each other); their results."""
    tasks = [cocotb.start_soon(c) for c in coros]
    return [await t for t in tasks]


async def servers(dut, num_vfs=2):
    """Both cards up, each probed by its own host: ``[(harness, pf, vfs)]`` for card A, card B."""
    ha, hb = CardHarness(dut, prefix="a_"), CardHarness(dut, prefix="b_")
    await start_twin(ha, hb)

    async def up(h):
        pf = await h.drv.probe()
        return h, pf, await h.drv.enable_sriov(num_vfs)
    return await both(up(ha), up(hb))


def endpoints(rc):
    """Type-0 functions the root complex enumerated below its host bridge."""
    found = []

    def walk(bus):
        for dev in bus.devices:
            if dev.header_type == 0:
                found.append(dev)
            if dev.subordinate:
                walk(dev.subordinate)
    walk(rc.host_bridge.bus)
    return found


async def counters(h):
    return {n: await h.drv.mgmt_read(getattr(NetRegs, n)) for n in
            ("TX_FRAMES", "RX_FRAMES", "UPLINK_OUT", "UPLINK_IN", "DROP_UNKNOWN")}


async def wait_frames(dut, up, n, cycles=20_000):
    """Until ``up`` has collected ``n`` frames from its card (or ``cycles`` passed)."""
    for _ in range(cycles // 100):
        if len(up.received) >= n:
            return
        await ClockCycles(dut.clk, 100)


@cocotb.test()
async def test_two_servers_enumerate(dut):
    """Each root complex finds exactly one card, with its Vendor / Device ID, and SR-IOV comes up
    on both; the topologies are the same, so are the addresses, and only the separate hosts keep
    the cards apart: a PF BAR2 register written on card A is not seen on card B (whose link
    carries nothing meanwhile), and the other way round."""
    (ha, pfa, vfsa), (hb, pfb, vfsb) = await servers(dut, 2)
    for h, pf, vfs in ((ha, pfa, vfsa), (hb, pfb, vfsb)):
        devs = endpoints(h.rc)
        assert [int(d.pcie_id) for d in devs] == [pf.rid], [d.pcie_id for d in devs]
        dev = h.rc.find_device(PcieId.from_int(pf.rid))
        assert (dev.vendor_id, dev.device_id) == (VENDOR_ID, DEVICE_ID), dev
        assert await h.t.cfg_read(pf.rid, 0) == VENDOR_ID | DEVICE_ID << 16
        assert len(vfs) == 2 and h.drv.sriov.num_vfs == 2
    assert (pfa.rid, pfa.bar0, ha.drv.bar2) == (pfb.rid, pfb.bar0, hb.drv.bar2)
    assert [v.rid for v in vfsa] == [v.rid for v in vfsb]
    # MigRegs.SEL is a plain read/write register, 0 after reset
    assert [await h.drv.mgmt_read(MG.SEL) for h in (ha, hb)] == [0, 0]
    quiet_b = hb.bridge.tlps_in, hb.bridge.tlps_out
    await ha.drv.mgmt_write(MG.SEL, 2)
    assert await ha.drv.mgmt_read(MG.SEL) == 2
    assert (hb.bridge.tlps_in, hb.bridge.tlps_out) == quiet_b, "card A's host reached card B"
    assert await hb.drv.mgmt_read(MG.SEL) == 0
    await hb.drv.mgmt_write(MG.SEL, 1)
    assert [await h.drv.mgmt_read(MG.SEL) for h in (ha, hb)] == [2, 1]


@cocotb.test()
async def test_virtio_two_hosts(dut):
    """On each server VF1 sends frames to VF2 of the same card, both servers at once: rings at
    the same bus addresses in two host memories, different frames, each guest gets exactly its
    own, byte exact and in order; each card counts only its own traffic."""
    sides = await servers(dut, 2)

    async def run(h, vfs, seed, sizes):
        rnd = random.Random(seed)
        a, b = await net(h, vfs[0]), await net(h, vfs[1])
        await b.post_rx(len(sizes))
        sent = [frame(b.mac, a.mac, n, rnd) for n in sizes]
        for f in sent:
            await a.send(f)
        return a, sent, await receive_n(b, len(sent))

    sizes = {"a_": [60, 300, 1514, 64], "b_": [1000, 61, 700]}
    results = await both(*(run(h, vfs, k, sizes[h.prefix]) for k, (h, _, vfs) in enumerate(sides)))
    for (h, _, _), (_, sent, got) in zip(sides, results):
        assert got == sent, f"card {h.prefix}: " + diff(got, sent)
        c = await counters(h)
        n = len(sizes[h.prefix])
        assert (c["TX_FRAMES"], c["RX_FRAMES"], c["UPLINK_OUT"]) == (n, n, 0), (h.prefix, c)
    (ga, _, _), (gb, _, _) = results
    assert (ga.tx.desc, ga.tx.avail) == (gb.tx.desc, gb.tx.avail), "expected the same bus addresses"


@cocotb.test()
async def test_uplink_to_uplink(dut):
    """Frames VF1 of card A sends to an unknown unicast MAC leave card A's uplink; the bench, as
    the network between the servers, puts them on card B's uplink with the destination rewritten
    to card B's VF1, whose guest receives them byte exact; the same from card B to card A.
    Nothing comes back out of the receiving card's uplink."""
    (ha, _, vfsa), (hb, _, vfsb) = await servers(dut, 2)
    ua, ub = Uplink(dut, ha.data_width, prefix="a_"), Uplink(dut, hb.data_width, prefix="b_")
    rnd = random.Random(11)
    ga, gb = await both(net(ha, vfsa[0]), net(hb, vfsb[0]))
    assert ga.mac == gb.mac == mac_of(1)
    await ga.post_rx(4)
    await gb.post_rx(4)
    out = [frame(UNKNOWN, ga.mac, n, rnd) for n in (60, 300, 1514)]
    for f in out:
        await ga.send(f)
    await wait_frames(dut, ua, len(out))
    assert ua.received == out, diff(ua.received, out)
    fwd = [mac_of(1) + f[6:] for f in out]
    for f in fwd:
        ub.send(f)
    got = await receive_n(gb, len(fwd))
    assert got == fwd, diff(got, fwd)
    # and back: card B's guest to the unknown MAC, into card A
    back = frame(UNKNOWN, gb.mac, 777, rnd)
    await gb.send(back)
    await wait_frames(dut, ub, 1)
    assert ub.received == [back], diff(ub.received, [back])
    ua.send(mac_of(1) + back[6:])
    assert await receive_n(ga, 1) == [mac_of(1) + back[6:]]
    assert len(ua.received) == len(out)
    ca, cb = await counters(ha), await counters(hb)
    assert (ca["UPLINK_OUT"], ca["UPLINK_IN"], cb["UPLINK_OUT"], cb["UPLINK_IN"]) == (3, 1, 1, 3), (ca, cb)
    assert ca["DROP_UNKNOWN"] == cb["DROP_UNKNOWN"] == 0, (ca, cb)
