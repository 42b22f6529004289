"""virtio-net on the card's functions through cocotbext-pcie's RootComplex: the transport
handshake, frames between functions and through the uplink, bad queues, isolation."""

import random

import cocotb
from cocotb.triggers import ClockCycles, Event

from regmap import MigRegs, VirtioRegs as V
from host_driver.virtio import (VirtioNetDriver, VirtioError, DirectAccess, HostMemory,
                                RX_QUEUE, TX_QUEUE, NET_HDR_F_DATA_VALID as DV)
from cosim.netpeer import l4_frame, l4_checksum_ok, IPPROTO_TCP, IPPROTO_UDP
from cosim.uplink import Uplink
from cosim.scenarios.card import bring_up
from cosim.scenarios.virtio import (diff, mac_of, frame, net, counters, receive_n,
                                    wait_needs_reset)
from hdl.virtio.engine import steering_bucket


@cocotb.test()
async def test_bringup_pf_and_vfs(dut):
    """virtio 1.x bring-up on the PF and two VFs; MAC and link from the device config;
    a driver that refuses VERSION_1 or skips FEATURES_OK gets no live device; reset returns
    the function to its initial state."""
    h, pf, vfs = await bring_up(dut, 2)
    for fn in (pf, *vfs):
        d = await net(h, fn)
        assert d.mac == mac_of(fn.index), d.mac
        assert await d.link_up()
        st = await d.read_status()
        assert st == V.S_ACKNOWLEDGE | V.S_DRIVER | V.S_FEATURES_OK | V.S_DRIVER_OK, hex(st)
        assert d.has_feature(V.F_VERSION_1) and d.has_feature(V.F_RING_EVENT_IDX)
    # refuse VERSION_1: FEATURES_OK does not stick
    d = VirtioNetDriver(DirectAccess(vfs[0]), vfs[0], HostMemory(h.t))
    await d.probe()
    try:
        await d.bring_up(refuse=("VERSION_1",))
        raise AssertionError("the device accepted a driver without VERSION_1")
    except VirtioError:
        pass
    assert not await d.read_status() & V.S_FEATURES_OK
    # skip FEATURES_OK: DRIVER_OK alone does not make the device live; a frame is not taken
    d = VirtioNetDriver(DirectAccess(vfs[1]), vfs[1], HostMemory(h.t))
    await d.probe()
    await d.bring_up(skip_features_ok=True)
    before = await counters(h)
    await d.send(frame(mac_of(0), d.mac or mac_of(2), 64, random.Random(1)))
    await ClockCycles(dut.clk, 3000)
    assert (await counters(h))["TX_FRAMES"] == before["TX_FRAMES"]
    assert await d.tx.get_used() == []
    # reset: status 0, queues back to their initial state
    await d.reset()
    assert await d.read_status() == 0
    for q in (RX_QUEUE, TX_QUEUE):
        await d.access.write(V.COMMON + V.Q_SELECT, q, 2)
        assert await d.access.read(V.COMMON + V.Q_SIZE, 2) == V.QUEUE_SIZE_MAX
        assert await d.access.read(V.COMMON + V.Q_MSIX, 2) == V.NO_VECTOR
        assert await d.access.read(V.COMMON + V.Q_ENABLE, 2) == 0


@cocotb.test()
async def test_guest_to_guest(dut):
    """Two VFs exchange frames of 60..1514 bytes (chained and indirect descriptors, and the
    header pushed in front of the frame in one descriptor, as Linux sends) byte exact and in
    order, with MSI-X on the receive queue; the PF's native path works alongside;
    no register access is trapped in direct mode."""
    h, pf, vfs = await bring_up(dut, 2)
    rnd = random.Random(2)
    a, b = await net(h, vfs[0]), await net(h, vfs[1])
    # The receivers wait on their vector rather than also polling every microsecond: a poll
    # that harvests the frames between the card's used-index write and its read of
    # used_event moves used_event past them, and the card then rightly sends no interrupt
    # (vring_need_event). This test is about the interrupt being sent to a driver that waits.
    a.poll_ns = b.poll_ns = 100_000
    await a.post_rx(32)
    await b.post_rx(32)
    sizes = [60, 64, 65, 100, 128, 500, 1000, 1500, 1514, 61, 62, 63]
    sent_ab = [frame(b.mac, a.mac, n, rnd) for n in sizes]
    for k, f in enumerate(sent_ab):
        await a.send(f, indirect=bool(k % 3 == 2), pushed=bool(k % 3 == 1))
    got = await receive_n(b, len(sent_ab))
    assert got == sent_ab, ([(len(x), len(y)) for x, y in zip(got, sent_ab)], len(got),
                            await counters(h), a.stats, b.stats)
    sent_ba = [frame(a.mac, b.mac, n, rnd) for n in sizes[:6]]
    for f in sent_ba:
        await b.send(f)
    assert await receive_n(a, len(sent_ba)) == sent_ba
    msi = [h.t.msi_count(d.fn.msix_vectors[1]) for d in (a, b)]
    c = await counters(h)
    assert min(msi) > 0, (msi, a.stats, b.stats, c["QUEUE_IRQS"], c["IRQ_SUPPRESSED"])
    assert a.access.traps == 0 and b.access.traps == 0
    c = await counters(h)
    assert c["RX_FRAMES"] == len(sizes) + 6 and c["DROP_BAD"] == 0 and c["DROP_SIZE"] == 0, c
    # the host's native path on the PF, while the guests' functions stay up
    p = await net(h, pf)
    await p.post_rx(4)
    f = frame(p.mac, a.mac, 200, rnd)
    await a.send(f)
    assert await receive_n(p, 1) == [f]


@cocotb.test()
async def test_uplink(dut):
    """Broadcast and unknown destinations leave by the uplink (a broadcast reaches the other
    functions that are up, too); frames from the uplink reach the function their MAC names; an
    uplink frame for no function is dropped and counted."""
    h, pf, vfs = await bring_up(dut, 2)
    up = Uplink(dut, h.data_width)
    rnd = random.Random(3)
    a, b = await net(h, vfs[0]), await net(h, vfs[1])
    await b.post_rx(8)
    bc = frame(b"\xff" * 6, a.mac, 90, rnd)
    unknown = frame(bytes.fromhex("021122334455"), a.mac, 333, rnd)
    await a.send(bc)
    await a.send(unknown)
    for _ in range(200):
        if len(up.received) == 2:
            break
        await ClockCycles(dut.clk, 100)
    assert up.received == [bc, unknown], diff(up.received, [bc, unknown])
    inbound = [frame(b.mac, bytes.fromhex("021122334455"), n, rnd) for n in (60, 777, 1514)]
    for f in inbound:
        up.send(f)
    up.send(frame(bytes.fromhex("02aabbccddee"), a.mac, 80, rnd))      # nobody's
    assert await receive_n(b, 4) == [bc] + inbound
    c = await counters(h)
    assert (c["UPLINK_OUT"], c["UPLINK_IN"], c["DROP_UNKNOWN"]) == (2, 4, 1), c


@cocotb.test()
async def test_bad_queues_and_isolation(dut):
    """A descriptor loop and an out-of-range head set NEEDS_RESET on the guilty function only;
    an oversized frame and a receive buffer too small are dropped and counted; the other guest's
    traffic goes on, and the reset function comes back. A receive buffer at 2**64 - 16 of 2048
    bytes (it would wrap to bus address 0) sets NEEDS_RESET with nothing written anywhere (no
    MemWr with that function's requester ID)."""
    h, pf, vfs = await bring_up(dut, 4)
    rnd = random.Random(4)
    a, b, c = [await net(h, vfs[k]) for k in range(3)]
    await b.post_rx(16)
    # 1. a loop in a's transmit chain: descriptor 0 -> 0
    slot = await a.mem.alloc(64, 16)
    q = a.tx
    await a.mem.write(q.desc + 0, (slot).to_bytes(8, "little") + (12).to_bytes(4, "little")
                      + (1).to_bytes(2, "little") + (0).to_bytes(2, "little"))
    await a.mem.write(q.avail + 4 + 2 * (q.avail_idx % q.size), (0).to_bytes(2, "little"))
    await a.mem.write(q.avail + 2, ((q.avail_idx + 1) & 0xFFFF).to_bytes(2, "little"))
    await a.notify(TX_QUEUE)
    await wait_needs_reset(dut, a)
    # b's traffic from c is not disturbed
    fs = [frame(b.mac, c.mac, n, rnd) for n in (64, 600, 1514)]
    for f in fs:
        await c.send(f)
    assert await receive_n(b, 3) == fs
    # 2. an out-of-range head on c's transmit queue
    qc = c.tx
    await c.mem.write(qc.avail + 4 + 2 * (qc.avail_idx % qc.size), (qc.size + 5).to_bytes(2, "little"))
    await c.mem.write(qc.avail + 2, ((qc.avail_idx + 1) & 0xFFFF).to_bytes(2, "little"))
    await c.notify(TX_QUEUE)
    for _ in range(100):
        if await c.read_status() & V.S_NEEDS_RESET:
            break
        await ClockCycles(dut.clk, 100)
    assert await c.read_status() & V.S_NEEDS_RESET
    cnt = await counters(h)
    assert cnt["DROP_BAD"] == 2, cnt
    # 3. a comes back after a reset and a new bring-up
    a = await net(h, vfs[0])
    f = frame(b.mac, a.mac, 300, rnd)
    await a.send(f)
    assert await receive_n(b, 1) == [f]
    # 4. an oversized frame (two descriptors adding up past the frame buffer) is dropped
    big = await a.mem.alloc(4096, 16)
    head = await a.tx.add_buffer([(big, 12), (big + 64, 2100)])
    await a.notify(TX_QUEUE)
    for _ in range(100):
        if (await counters(h))["DROP_SIZE"] >= 1:
            break
        await ClockCycles(dut.clk, 100)
    assert (await counters(h))["DROP_SIZE"] == 1
    assert not await a.read_status() & V.S_NEEDS_RESET
    assert head in [i for i, _ in await a.tx.get_used()]     # the buffer is still returned
    assert (await counters(h))["DROP_BAD"] == 2
    # 5. a receive buffer whose end passes the top of the 64-bit space
    d = await net(h, vfs[3])
    writes = []                # MemWr with d's requester ID from now on, but MSI-X messages
    msi = {v.addr for v in vfs[3].msix_vectors}

    def hook(hdr, payload, t0, t1):
        if hdr[0] in (0x40, 0x60) and int.from_bytes(hdr[4:6], "big") == vfs[3].rid:
            addr = int.from_bytes(hdr[8:16] if hdr[0] == 0x60 else hdr[8:12], "big") & ~3
            if addr not in msi:
                writes.append(hdr.hex())
    h.bridge.tx_hook = hook
    await d.rx.add_buffer(in_bufs=[(2**64 - 16, 2048)])
    await a.send(frame(d.mac, a.mac, 200, rnd))
    for _ in range(100):
        if await d.read_status() & V.S_NEEDS_RESET:
            break
        await ClockCycles(dut.clk, 100)
    assert await d.read_status() & V.S_NEEDS_RESET
    h.bridge.tx_hook = None
    assert writes == [], f"the card wrote for the function with the wrapping buffer: {writes}"
    assert (await counters(h))["DROP_BAD"] == 3
    assert await d.rx.get_used() == []                        # nothing claimed either


@cocotb.test()
async def test_hypervisor_direct_trap_native(dut):
    """Guests in direct mode (0 traps) and trap mode (every access trapped, still working),
    one guest with two devices, the host's native path on the PF at the same time (it never
    touches the PF's virtio device); resetting one guest's device does not disturb the others."""
    from host_driver.system.hypervisor import Hypervisor
    h, pf, vfs = await bring_up(dut, 4)
    rnd = random.Random(5)
    hv = Hypervisor(h.drv, exit_ns=1_000)
    native = await hv.start_host_native()
    g1 = await hv.create_guest("g1", [vfs[0]], "direct")
    g2 = await hv.create_guest("g2", [vfs[1]], "trap")
    g3 = await hv.create_guest("g3", [vfs[2], vfs[3]], "direct")
    n1, n2, (n3a, n3b) = g1.nics[0], g2.nics[0], g3.nics
    traps_bringup = g2.traps
    assert g1.traps == 0 and g3.traps == 0 and traps_bringup > 20
    for n in (n1, n2, n3a, n3b):
        await n.post_rx(16)
    src = (h.t.alloc_host_mem(0x2000) + 0xFFF) & ~0xFFF
    dst = (h.t.alloc_host_mem(0x2000) + 0xFFF) & ~0xFFF
    for k in range(3):
        # guest traffic: g1 <-> g2, g3 between its own two devices, g1 -> g3
        f12 = [frame(n2.mac, n1.mac, 64 + 100 * j, rnd) for j in range(4)]
        f21 = [frame(n1.mac, n2.mac, 1500 - 200 * j, rnd) for j in range(3)]
        f33 = [frame(n3b.mac, n3a.mac, 300 + j, rnd) for j in range(3)]
        for f in f12:
            await n1.send(f)
        for f in f21:
            await n2.send(f)
        for f in f33:
            await n3a.send(f)
        # the host's native path meanwhile
        data = bytes(rnd.getrandbits(8) for _ in range(1024))
        await h.t.host_write(src, data)
        await native.copy_through_card(src, dst, len(data), card=0x8000)
        assert await h.t.host_read(dst, len(data)) == data
        got2 = await receive_n(n2, len(f12))
        got1 = await receive_n(n1, len(f21))
        got3 = await receive_n(n3b, len(f33))
        assert got2 == f12, diff(got2, f12)
        assert got1 == f21, diff(got1, f21)
        assert got3 == f33, diff(got3, f33)
    assert g1.traps == 0 and g3.traps == 0
    assert g2.traps > traps_bringup, "trap-mode doorbells and reads were not trapped"
    # the host native path never touched the PF's virtio device
    assert await h.t.mmio_read(pf.bar0 + V.COMMON + V.STATUS, 1) == 0
    # g1's device is reset (and brought up again) while g3 -> g2 traffic flows
    fs = [frame(n2.mac, n3a.mac, 200 + j, rnd) for j in range(6)]
    for f in fs[:3]:
        await n3a.send(f)
    await n1.reset()
    for f in fs[3:]:
        await n3a.send(f)
    got = await receive_n(n2, len(fs))
    assert got == fs, diff(got, fs)
    await n1.bring_up()
    await n1.post_rx(4)
    f = frame(n1.mac, n2.mac, 128, rnd)
    await n2.send(f)
    assert await receive_n(n1, 1) == [f]


@cocotb.test()
async def test_zero_length_descriptor(dut):
    """A zero-length descriptor in the middle of a chain is skipped; the frame goes through."""
    h, pf, vfs = await bring_up(dut, 2)
    a, b = await net(h, vfs[0]), await net(h, vfs[1])
    await b.post_rx(2)
    f = frame(b.mac, a.mac, 150, random.Random(6))
    buf = await a.mem.alloc(1024, 64)
    await a.mem.write(buf, bytes(12))
    await a.mem.write(buf + 256, f)
    await a.tx.add_buffer([(buf, 12), (buf + 128, 0), (buf + 256, len(f))])
    await a.notify(TX_QUEUE)
    assert await receive_n(b, 1) == [f]


@cocotb.test()
async def test_guests_behind_iommu(dut):
    """Guests whose memory is I/O virtual: every ring and buffer address goes through the VF's
    domain (frames byte exact, pieces cut at pages, the device TLB used). A transmit buffer or a
    receive buffer outside the domain sets NEEDS_RESET on that function and nothing is written
    there; the other guest keeps working."""
    from host_driver.system.hypervisor import Hypervisor
    from host_driver.iommu import Iommu
    from cosim.scenarios.wire import WireLog
    h, pf, vfs = await bring_up(dut, 3)
    h.pf = pf
    await pf.setup_msix()
    rnd = random.Random(7)
    iommu = Iommu(h.drv)
    hv = Hypervisor(h.drv, iommu=iommu, guest_pages=128)
    g1 = await hv.create_guest("g1", [vfs[0]])
    g2 = await hv.create_guest("g2", [vfs[1]], "trap")
    g3 = await hv.create_guest("g3", [vfs[2]])
    n1, n2, n3 = g1.nics[0], g2.nics[0], g3.nics[0]
    for n in (n1, n2, n3):
        await n.post_rx(8)
    fs = [frame(n2.mac, n1.mac, size, rnd) for size in (60, 1514, 777, 1000, 64)]
    for f in fs:
        await n1.send(f)
    got = await receive_n(n2, len(fs))
    assert got == fs, diff(got, fs)
    back = [frame(n1.mac, n2.mac, 1200, rnd) for _ in range(3)]
    for f in back:
        await n2.send(f)
    assert await receive_n(n1, 3) == back
    c = await iommu.counters()
    assert c["atc_hits"] > 20 and c["blocked"] == 0, c
    # a transmit buffer outside g3's domain (its IOVA is a real bus address elsewhere)
    victim = (h.t.alloc_host_mem(0x2000) + 0xFFF) & ~0xFFF
    await h.t.host_write(victim, bytes([0x77]) * 0x1000)
    outside = 128 << 12
    await n3.tx.add_buffer([(outside, 12), (outside + 64, 100)])
    await n3.notify(TX_QUEUE)
    for _ in range(100):
        if await n3.read_status() & V.S_NEEDS_RESET:
            break
        await ClockCycles(dut.clk, 100)
    assert await n3.read_status() & V.S_NEEDS_RESET
    # a receive buffer outside g1's domain: the frame meets it after the 8 good ones; every
    # write the card makes meanwhile lands in a present page of some domain (or is an MSI-X)
    wire = WireLog(h)
    await n1.rx.add_buffer(in_bufs=[(outside + 0x800, 2048)])
    cnt0 = await counters(h)
    for k in range(9):
        await n2.send(frame(n1.mac, n2.mac, 100, rnd))
    for _ in range(200):
        if await n1.read_status() & V.S_NEEDS_RESET:
            break
        await ClockCycles(dut.clk, 100)
    assert await n1.read_status() & V.S_NEEDS_RESET
    h.bridge.tx_hook = None
    pages = [(b, 4096) for d in iommu.domains.values() for b in d.present.values()]
    msi = {v.addr for fn in (pf, *vfs) for v in fn.msix_vectors}
    stray = [w for w in wire.writes if w[0] not in msi
             and not any(b <= w[0] and w[0] + w[1] <= b + n for b, n in pages)]
    assert stray == [], stray
    assert await h.t.host_read(victim, 0x1000) == bytes([0x77]) * 0x1000
    cnt = await counters(h)
    assert cnt["XLATE_ERRORS"] >= 2 and cnt["DROP_BAD"] == cnt0["DROP_BAD"] + 1, cnt
    # g1 comes back after a reset; g2 receives from it
    await n1.bring_up()
    f = frame(n2.mac, n1.mac, 300, rnd)
    await n1.send(f)
    assert await receive_n(n2, 1) == [f]


@cocotb.test()
async def test_mrg_rxbuf_frames_span_buffers(dut):
    """With MRG_RXBUF and 256-byte receive buffers, frames of 60..1514 bytes arrive byte exact
    over as many buffers as they need (num_buffers > 1 in the first header); without MRG_RXBUF
    the same buffers are too small: a frame that does not fit is dropped (DROP_SIZE) and its
    buffer comes back empty."""
    h, pf, vfs = await bring_up(dut, 2)
    rnd = random.Random(8)
    a = await net(h, vfs[0])
    acc = DirectAccess(vfs[1])
    b = VirtioNetDriver(acc, vfs[1], HostMemory(h.t), rx_buf_size=256)
    await b.probe()
    await b.bring_up()
    assert b.has_feature(V.F_NET_MRG_RXBUF)
    await b.post_rx(48)
    sizes = [60, 243, 244, 245, 500, 1000, 1514, 61, 1499]
    sent = [frame(b.mac, a.mac, n, rnd) for n in sizes]
    for f in sent:
        await a.send(f)
    got = await receive_n(b, len(sent))
    assert got == sent, diff(got, sent)
    assert b.stats["merged"] == sum(1 for n in sizes if n + 12 > 256), b.stats
    c = await counters(h)
    assert c["DROP_SIZE"] == 0 and c["DROP_NOBUF"] == 0, c
    await b.bring_up(refuse=("MRG_RXBUF",))
    assert not b.has_feature(V.F_NET_MRG_RXBUF)
    await b.post_rx(8)
    fits, too_big = frame(b.mac, a.mac, 200, rnd), frame(b.mac, a.mac, 600, rnd)
    await a.send(too_big)
    await a.send(fits)
    assert await receive_n(b, 1) == [fits]
    c = await counters(h)
    assert c["DROP_SIZE"] == 1 and b.stats["rx_empty"] == 1, (c, b.stats)


@cocotb.test()
async def test_checksum_offload(dut):
    """VIRTIO_NET_F_CSUM and GUEST_CSUM: TCP and UDP over IPv4 and IPv6 sent with a partial
    checksum leave by the uplink, and reach another VF, fully checksummed (judged at the uplink
    by our own checker); a receiver that negotiated GUEST_CSUM gets DATA_VALID exactly when the
    TCP / UDP checksum holds (a bad one, a non-IP frame, a padded one: no flag); a driver that
    did not negotiate them is left alone both ways; NEEDS_CSUM with the field outside the frame
    drops that frame only, counted."""
    h, pf, vfs = await bring_up(dut, 3)
    up = Uplink(dut, h.data_width)
    rnd = random.Random(20)
    a, b = await net(h, vfs[0]), await net(h, vfs[1])
    for d in (a, b):
        assert d.has_feature(V.F_NET_CSUM) and d.has_feature(V.F_NET_GUEST_CSUM)
    await b.post_rx(32)
    far = bytes.fromhex("021122334455")
    c0 = await counters(h)

    def segments(dst, src, partial):
        out = []
        for ips in (("10.0.0.1", "10.0.0.2"), ("fd00::1", "fd00::2")):
            for proto in (IPPROTO_TCP, IPPROTO_UDP):
                for size in (0, 1, 333, 1400):
                    payload = rnd.randbytes(size)
                    part = l4_frame(src, dst, *ips, proto, payload, partial=True)
                    full = l4_frame(src, dst, *ips, proto, payload)[0]
                    out.append((part, full))
        return out

    # 1. to the uplink: the checksum is filled in on the way out
    cases = segments(far, a.mac, True)
    for (f, cs, co), _ in cases:
        await a.send(f, csum=(cs, co))
    for _ in range(400):
        if len(up.received) == len(cases):
            break
        await ClockCycles(dut.clk, 100)
    assert up.received == [full for _, full in cases], diff(up.received, [f for _, f in cases])
    assert all(l4_checksum_ok(f) for f in up.received)
    # 2. to another VF: filled in, and DATA_VALID
    cases = segments(b.mac, a.mac, True)
    for (f, cs, co), _ in cases:
        await a.send(f, csum=(cs, co))
    got = await receive_n(b, len(cases))
    assert got == [full for _, full in cases], diff(got, [f for _, f in cases])
    assert b.rx_flags == [DV] * len(cases), b.rx_flags
    # 3. from the uplink: right, wrong, padded, not IP
    good = l4_frame(far, b.mac, "10.9.0.1", "10.9.0.2", IPPROTO_TCP, rnd.randbytes(900))[0]
    bad = l4_frame(far, b.mac, "fd00::5", "fd00::6", IPPROTO_UDP, rnd.randbytes(99),
                   corrupt=True)[0]
    short = l4_frame(far, b.mac, "10.9.0.1", "10.9.0.2", IPPROTO_UDP, b"ok")[0]
    padded = short + bytes(60 - len(short))
    other = frame(b.mac, far, 200, rnd)
    inbound = [good, bad, padded, other, good]
    b.rx_flags.clear()
    for f in inbound:
        up.send(f)
    assert await receive_n(b, len(inbound)) == inbound
    assert b.rx_flags == [DV, 0, 0, 0, DV], b.rx_flags
    # 4. the checksum field outside the frame: that frame is dropped, the next one goes
    (f, cs, co), full = segments(b.mac, a.mac, True)[1]
    b.rx_flags.clear()
    await a.send(f, csum=(len(f) - 1, 0))
    await a.send(f, csum=(cs, co))
    assert await receive_n(b, 1) == [full] and b.rx_flags == [DV]
    c = diff_counters(c0, await counters(h))
    assert c["CSUM_FILLED"] == 2 * 16 + 1 and c["CSUM_VALID"] == 16 + 3 and \
        c["CSUM_BAD"] == 1 and c["DROP_CSUM"] == 1, c
    # 5. drivers without the features: nothing filled, nothing flagged
    a2 = await net(h, vfs[2], refuse=("CSUM", "GUEST_CSUM"))
    assert not a2.has_feature(V.F_NET_CSUM) and not a2.has_feature(V.F_NET_GUEST_CSUM)
    await a2.post_rx(8)
    (f, cs, co), _ = segments(b.mac, a2.mac, True)[2]
    b.rx_flags.clear()
    await a2.send(f, csum=(cs, co))              # (not allowed without CSUM: left as it is)
    assert await receive_n(b, 1) == [f] and b.rx_flags == [0], b.rx_flags
    ok = l4_frame(a.mac, a2.mac, "10.0.0.1", "10.0.0.2", IPPROTO_UDP, rnd.randbytes(64))[0]
    await a.send(ok)
    assert await receive_n(a2, 1) == [ok] and a2.rx_flags == [0], a2.rx_flags


def diff_counters(before, after):
    return {k: after[k] - before[k] for k in after}


@cocotb.test()
async def test_queue_coalescing(dut):
    """Used-ring coalescing per queue (``NetRegs.COAL_Q``) over the default (``COAL``): eight
    frames VF1 -> VF2 queued while VF1 is stopped, then let go at once. VF1's transmit queue on
    its own count of 1 publishes each element; VF2's receive queue publishes once on the
    default count of 8, and eight times on its own count of 1. Every publication is an
    interrupt or a suppressed one; every frame arrives byte exact."""
    h, pf, vfs = await bring_up(dut, 2)
    rnd = random.Random(21)
    a, b = await net(h, vfs[0]), await net(h, vfs[1])
    await b.post_rx(32)
    await h.drv.set_coalescing(8, 60000)
    await h.drv.set_coalescing(1, 60000, fidx=a.fn.index, queue=TX_QUEUE)

    async def burst(n):
        await h.drv.mgmt_write(MigRegs.SEL, a.fn.index)
        await h.drv.mgmt_write(MigRegs.CTRL, 1)
        sent = [frame(b.mac, a.mac, 60 + 50 * i, rnd) for i in range(n)]
        before = await counters(h)
        for f in sent:
            await a.send(f)
        await h.drv.mgmt_write(MigRegs.CTRL, 0)
        assert await receive_n(b, n) == sent
        await ClockCycles(dut.clk, 2000)
        after = await counters(h)
        await a.reap_tx()
        return sum(after[k] - before[k] for k in ("QUEUE_IRQS", "IRQ_SUPPRESSED"))

    assert await burst(8) == 8 + 1
    await h.drv.set_coalescing(1, 60000, fidx=b.fn.index, queue=RX_QUEUE)
    assert await burst(8) == 8 + 8
    await h.drv.default_coalescing(b.fn.index, RX_QUEUE)
    assert await burst(8) == 8 + 1
    for bad in ((256, 0, None, None), (1, 1 << 16, None, None), (1, 1, 99, 0), (1, 1, 1, V.NUM_QUEUES_VALUE)):
        try:
            await h.drv.set_coalescing(*bad)
            raise AssertionError(f"set_coalescing{bad} was accepted")
        except ValueError as e:
            assert "\n" not in str(e)
    await h.drv.set_coalescing(8, 1024)


@cocotb.test()
async def test_reset_while_a_frame_is_delivered(dut):
    """VF2's driver resets its function while the card is delivering a frame into it (the
    card is reading VF2's receive descriptor; host reads answered 3 us late): the reset
    completes (status reads 0) only once the card has let the function go, and nothing is
    written with VF2's requester ID after that. The driver sets VF2 up again and the frames
    sent then all arrive, in order (the device's indices started over with the rings)."""
    h, pf, vfs = await bring_up(dut, 2)
    rnd = random.Random(22)
    a, b = await net(h, vfs[0]), await net(h, vfs[1])
    await h.drv.set_coalescing(1, 1024)
    await b.post_rx(16)
    reading = Event()
    writes = []                    # when the card wrote with VF2's requester ID (not MSI-X)
    msi = {v.addr for v in vfs[1].msix_vectors}
    rxq = b.rx

    def hook(hdr, payload, t0, t1):
        if int.from_bytes(hdr[4:6], "big") != vfs[1].rid:
            return
        addr = int.from_bytes(hdr[8:16] if hdr[0] & 0x20 else hdr[8:12], "big") & ~3
        if hdr[0] in (0x00, 0x20) and rxq.desc <= addr < rxq.desc + 16 * rxq.size:
            reading.set()
        elif hdr[0] in (0x40, 0x60) and addr not in msi:
            writes.append(t1)
    h.bridge.tx_hook = hook
    h.bridge.read_latency_ns = 3000
    for f in [frame(b.mac, a.mac, 200, rnd) for _ in range(3)]:
        await a.send(f)
    await reading.wait()
    await b.reset()
    done_ns = h.t.now_ns()
    h.bridge.read_latency_ns = 0
    await ClockCycles(dut.clk, 4000)
    h.bridge.tx_hook = None
    assert writes and [t for t in writes if t > done_ns] == [], (done_ns, writes)
    await b.bring_up()
    await b.post_rx(16)
    await a.reap_tx()
    sent = [frame(b.mac, a.mac, 60 + 90 * i, rnd) for i in range(6)]
    for f in sent:
        await a.send(f)
    assert await receive_n(b, len(sent)) == sent
    await h.drv.set_coalescing(8, 1024)


@cocotb.test()
async def test_multiqueue(dut):
    """VIRTIO_NET_F_MQ: two VFs with four queue pairs each, enabled through the control queue
    (VQ_PAIRS_SET; bad counts and unknown classes get VIRTIO_NET_ERR). A flow's frames are
    received on the pair its receiver last sent it from (automatic receive steering), byte
    exact, in order; with fewer pairs in use a flow of a pair no longer in use comes in on
    pair 0. A command without a buffer for its ack sets NEEDS_RESET on that function only."""
    h, pf, vfs = await bring_up(dut, 2)
    n = V.MAX_PAIRS
    a, b = (VirtioNetDriver(DirectAccess(fn), fn, HostMemory(h.t), queue_size=16, pairs=n)
            for fn in vfs)
    for d in (a, b):
        await d.probe()
        await d.bring_up()
        assert d.has_feature(V.F_NET_MQ) and d.has_feature(V.F_NET_CTRL_VQ)
        await d.post_rx(8)
    # the control queue: what it refuses
    mq, pairs_set = V.CTRL_MQ, V.CTRL_MQ_VQ_PAIRS_SET
    for cls, cmd, data in ((mq, pairs_set, 0), (mq, pairs_set, n + 1), (mq, 1, 1),
                           (0, 0, 1)):
        assert await a.command(cls, cmd, data.to_bytes(2, "little")) == V.CTRL_ERR, (cls, cmd)
    assert await a.command(mq, pairs_set, n.to_bytes(2, "little")) == V.CTRL_OK
    # one UDP flow per pair, each in a bucket of its own
    flows, port = [], 4000
    while len(flows) < n:
        fr, _, _ = l4_frame(a.mac, b.mac, "10.0.0.1", "10.0.0.2", IPPROTO_UDP, b"x",
                            sport=port, dport=7)
        if steering_bucket(fr) not in {steering_bucket(f) for f in flows}:
            flows.append(fr)
        port += 1
    rnd = random.Random(21)

    def flow_frame(k, src, dst, size):
        """A frame of flow ``k`` from ``src`` to ``dst`` (the reverse direction swaps the
        MAC addresses, IP addresses and ports: the same bucket)."""
        sport = int.from_bytes(flows[k][34:36], "big")
        payload = bytes(rnd.getrandbits(8) for _ in range(size))
        if src is a:
            fr, _, _ = l4_frame(a.mac, b.mac, "10.0.0.1", "10.0.0.2", IPPROTO_UDP, payload,
                                sport=sport, dport=7)
        else:
            fr, _, _ = l4_frame(b.mac, a.mac, "10.0.0.2", "10.0.0.1", IPPROTO_UDP, payload,
                                sport=7, dport=sport)
        assert steering_bucket(fr) == steering_bucket(flows[k])
        return fr

    # b sends flow k on pair k: a has no flow known yet, takes them all on pair 0
    sent = [flow_frame(k, b, a, 40 + 30 * k) for k in range(n)]
    for k, f in enumerate(sent):
        await b.send(f, pair=k)
    # (pairs are served round robin: in order within a pair, in any order between them)
    assert sorted(await receive_n(a, n)) == sorted(sent)
    assert a.rx_per_queue == {0: n}, a.rx_per_queue
    # a answers each flow from pair n - 1 - k: b takes flow k on pair k
    sent = [flow_frame(k, a, b, 100 + k) for k in range(n) for _ in range(3)]
    for i, f in enumerate(sent):
        await a.send(f, pair=n - 1 - i // 3)
    got = await receive_n(b, len(sent))
    assert sorted(got) == sorted(sent), diff(got, sent)
    assert b.rx_per_queue == {2 * k: 3 for k in range(n)}, b.rx_per_queue
    for k in range(n):                          # in order within each flow (one queue each)
        mine = [f for f in got if f[34:38] == sent[3 * k][34:38]]
        assert mine == sent[3 * k:3 * k + 3]
    # and a learnt the flows from its sends: b's frames of flow k come in on a's pair n-1-k
    a.rx_per_queue.clear()
    sent = [flow_frame(k, b, a, 64) for k in range(n)]
    for k, f in enumerate(sent):
        await b.send(f, pair=k)
    assert sorted(await receive_n(a, n)) == sorted(sent)
    assert a.rx_per_queue == {2 * (n - 1 - k): 1 for k in range(n)}, a.rx_per_queue
    # b goes down to two pairs: flows of pairs 2 and 3 come in on pair 0
    await b.set_pairs(2)
    b.rx_per_queue.clear()
    sent = [flow_frame(k, a, b, 80) for k in range(n)]
    for f in sent:
        await a.send(f, pair=0)
    assert sorted(await receive_n(b, n)) == sorted(sent)
    assert b.rx_per_queue == {0: 3, 2: 1}, b.rx_per_queue
    c = await counters(h)
    assert c["DROP_BAD"] == 0 and c["DROP_NOBUF"] == 0, c
    # a command with nothing to write its ack into: b needs a reset, a does not
    q = 2 * n
    slot = b._pool[q].pop()
    await b.mem.write(slot, bytes([mq, pairs_set, 2, 0]))
    await b.queues[q].add_buffer([(slot, 4)])
    await b.notify(q)
    await wait_needs_reset(dut, b)
    assert not await a.read_status() & V.S_NEEDS_RESET
    assert (await counters(h))["DROP_BAD"] == 1
