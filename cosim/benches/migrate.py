"""VF state save / restore on the card (issue 7, first part): quiesce a VF with traffic,
export its virtio state, lose it, import it back, resume; the guest's queues go on where they
stopped."""

import random

import cocotb
from cocotb.triggers import ClockCycles

from regmap import VirtioRegs as V, MigRegs as MG, NetRegs
from host_driver.vf_state import CardVfState, VfStateError
from cosim.scenarios.card import bring_up
from cosim.scenarios.virtio import net, frame, receive_n
from cosim.scenarios.dirty import WireWrites


@cocotb.test()
async def test_vf_save_restore(dut):
    """Frames VF1 -> VF2, then VF1 is stopped (idle), its state exported, the function reset
    (virtio status 0 clears the device's queue indices), the state imported and VF1 resumed:
    the export after the import is byte-identical and the guest's traffic resumes in order
    with nothing lost; a blob of another version or a cut one is refused before anything is
    written."""
    h, pf, vfs = await bring_up(dut, 2)
    rnd = random.Random(7)
    a, b = await net(h, vfs[0]), await net(h, vfs[1])
    await b.post_rx(32)
    first = [frame(b.mac, a.mac, n, rnd) for n in (60, 300, 1514, 64, 900)]
    for f in first:
        await a.send(f)
    assert await receive_n(b, len(first)) == first
    await a.reap_tx()
    # the PF gave VF1's transmit queue its own coalescing: it moves with the state
    coal = 3 | 500 << 16 | NetRegs.COAL_Q_OWN
    await h.drv.set_coalescing(3, 500, fidx=vfs[0].index, queue=1)
    st = CardVfState(h.drv)
    await st.quiesce(vfs[0])
    blob = await st.export_state(vfs[0])
    parsed = st.parse(blob)
    assert parsed["queues"][1][6] == len(first) and parsed["queues"][1][7] == len(first)
    assert [q[8] for q in parsed["queues"]] == [0, coal] + [0] * (V.NUM_QUEUES_VALUE - 2), \
        parsed["queues"]
    assert parsed["status"] & V.S_DRIVER_OK
    # a stopped function takes no new transmit
    pending = frame(b.mac, a.mac, 128, rnd)
    await a.send(pending)
    tx0 = await h.drv.mgmt_read(NetRegs.TX_FRAMES)
    await ClockCycles(dut.clk, 3000)
    assert await h.drv.mgmt_read(NetRegs.TX_FRAMES) == tx0
    # lose the state: a virtio reset clears the device's indices; the PF forgets the queue's
    # coalescing
    await a.access.write(V.COMMON + V.STATUS, 0, 1)
    await h.drv.default_coalescing(vfs[0].index, 1)
    await h.drv.mgmt_write(MG.SEL, vfs[0].index)
    await h.drv.mgmt_write(MG.Q_SEL, 1)
    assert await h.drv.mgmt_read(MG.Q_AVAIL) == 0
    # a bad blob is refused with nothing written
    for bad in (blob[:-3], blob[:4] + b"\x09\x00" + blob[6:]):
        try:
            await st.import_state(vfs[0], bad)
            raise AssertionError("a bad state blob was accepted")
        except VfStateError as e:
            assert "\n" not in str(e)
    assert await a.access.read(V.COMMON + V.STATUS, 1) == 0
    await st.import_state(vfs[0], blob)
    again = await st.export_state(vfs[0])
    changed = {k: (v, st.parse(again)[k]) for k, v in st.parse(blob).items()
               if st.parse(again)[k] != v}
    assert again == blob, f"the restored state differs from the saved one: {changed}"
    await st.resume(vfs[0])
    rest = [frame(b.mac, a.mac, n, rnd) for n in (100, 1500, 61)]
    for f in rest:
        await a.send(f)
    assert await receive_n(b, 1 + len(rest)) == [pending] + rest
    # the sender's used elements come after the frame reached the receiver: wait for them
    sent = 0
    for _ in range(100):
        sent += await a.reap_tx()
        if sent >= 1 + len(rest):
            break
        await ClockCycles(dut.clk, 50)
    assert sent == 1 + len(rest)


def tampered(record):
    """A wrong VDEV version, a wrong block count and a missing VF-info block, each with the
    reason the restore must give."""
    from host_driver.system.vf_save import BlockType, VDEV_VERSION, split, join, header_payload
    blocks = split(record)
    (_, _head), body = blocks[0], blocks[1:]
    no_info = [b for b in body if b[0] != BlockType.VF_INFO]
    return [
        (join([(BlockType.HEADER, header_payload(VDEV_VERSION + 1, len(blocks)))] + body),
         f"VDEV version {VDEV_VERSION + 1} in the record"),
        (join([(BlockType.HEADER, header_payload(VDEV_VERSION, len(blocks) + 1))] + body),
         f"block count mismatch: header says {len(blocks) + 1}, record holds {len(blocks)}"),
        (join([(BlockType.HEADER, header_payload(VDEV_VERSION, 1 + len(no_info)))] + no_info),
         "missing VF-info block"),
    ]


async def refused_untouched(h, fn, sr, vm):
    """Each bad record in the repository is refused, with a one-line reason, before anything
    reaches the card: the saved VF's state reads back the same after each attempt."""
    from host_driver.system.vf_save import RestoreError
    st = CardVfState(h.drv)
    before = await st.export_state(fn)              # (the saved VF stays quiesced)
    name = sr.record_names(vm.name)[0]
    good = sr.repo.get(name)
    for bad, why in tampered(good):
        sr.repo.put(name, bad)
        try:
            await sr.restore(vm)
            raise AssertionError(f"a record with this defect was restored: {why}")
        except RestoreError as e:
            assert why in str(e) and "\n" not in str(e), str(e)
        assert await st.export_state(fn) == before, why
    sr.repo.put(name, good)


@cocotb.test()
async def test_fast_save_restore_under_traffic(dut):
    """The modified fast save and the fast restore (host_driver.system.vf_save) on the real card,
    while the guest keeps transmitting: frames go through the synthetic adapter while the VF is
    saved and restored, the VF never leaves the assigned state, every frame the VF path took
    reaches the receiving VF in order, none is lost or duplicated, and a second restore takes
    the skip path."""
    from host_driver.system.vf_save import (AssignedVm, FrameLedger, HostVf, RuntimeRepository,
                                            VfAssignment, VfSaveRestore)
    h, pf, vfs = await bring_up(dut, 2)
    a, b = await net(h, vfs[0]), await net(h, vfs[1])
    await b.post_rx(64)
    ledger = FrameLedger(now_us=lambda: h.t.now_ns() / 1000)
    on_vf = []                                     # sequence numbers the VF path carries

    def frame_of(seq):                             # 60..259 bytes, the number after the header
        return b.mac + a.mac + b"\x88\xb5" + seq.to_bytes(4, "little") + bytes(42 + seq % 200)
    vm = AssignedVm.direct("guest1", vfs[0], luid=0x51DE, ledger=ledger, vf_port=on_vf.append)
    sr = VfSaveRestore(CardVfState(h.drv), RuntimeRepository(), {1: HostVf(vfs[0], 0x51DE)})
    sending = True
    sent_real = []

    async def guest():
        seq = 0
        while sending:
            vm.send(seq)
            seq += 1
            while len(sent_real) < len(on_vf):        # the VF path: a real frame on VF1
                s = on_vf[len(sent_real)]
                await a.send(frame_of(s))
                await a.reap_tx()
                sent_real.append(s)
            await ClockCycles(dut.clk, 300)
    job = cocotb.start_soon(guest())
    await ClockCycles(dut.clk, 6000)
    save_steps = await sr.save(vm)
    await ClockCycles(dut.clk, 3000)                 # the guest runs on the synthetic adapter
    await a.access.write(V.COMMON + V.STATUS, 0, 1)  # the VF's state is gone
    restore_steps = await sr.restore(vm)
    await ClockCycles(dut.clk, 6000)
    await sr.save(vm)                                # a second save and restore of the
    await refused_untouched(h, vfs[0], sr, vm)       # VF, which stayed assigned throughout,
    again = await sr.restore(vm)                     # after three bad records
    await ClockCycles(dut.clk, 4000)
    sending = False
    await job
    got = await receive_n(b, len(sent_real))
    seqs = [int.from_bytes(f[14:18], "little") for f in got]
    dut._log.info("fast save/restore: %d frames, %d on the VF, %d on the synthetic adapter",
                  len(ledger.deliveries), len(on_vf), len(ledger.deliveries) - len(on_vf))
    assert save_steps == ["switch_to_synthetic", "quiesce_vf", "export_vf_state", "vsp_save",
                          "vmswitch_save_synthetic"], save_steps
    assert "skip_create_assign" in restore_steps and "skip_create_assign" in again
    assert "assign_vf" not in restore_steps + again
    assert set(vm.assignment_log) == {VfAssignment.ASSIGNED}
    assert not ledger.lost and not ledger.duplicated, (ledger.lost, ledger.duplicated)
    first = next((i for i, (x, y) in enumerate(zip(seqs, on_vf)) if x != y), None)
    assert seqs == on_vf, (len(seqs), len(on_vf), first, seqs[first - 2:first + 4] if first else seqs[-4:],
                           on_vf[first - 2:first + 4] if first else on_vf[-4:])
    assert len(ledger.deliveries) > len(on_vf) > 10, "both paths must have carried frames"


@cocotb.test()
async def test_dirty_log_covers_every_page_written(dut):
    """VF1 -> VF2 frames and VF1's DMA writes with both VFs' dirty logs on: every page either
    VF's MemWr TLPs touch on the wire (received frames, used rings, DMA payload, descriptor
    status) is marked in its bitmap, harvested while the traffic runs and once after; the
    card marks nothing else (only the page's byte group of eight), a write outside a bitmap's
    range sets that function's overflow bit, and a function with its log off costs no mark."""
    from host_driver.dirty_log import DirtyLog
    from host_driver.dma import DmaQueue
    from regmap import DescStatus
    h, pf, vfs = await bring_up(dut, 3)
    rnd = random.Random(19)
    wire = WireWrites(h)
    log = DirtyLog(h.drv)
    first, pages = 0, 1 << 20                       # bus addresses 0 .. 4 GiB
    for vf in vfs[:2]:
        await log.start(vf.index, first, pages)
    a, b = await net(h, vfs[0]), await net(h, vfs[1])
    await b.post_rx(32)
    q = await DmaQueue(vfs[0], entries=16).setup()
    c = await net(h, vfs[2])                         # VF3: log off
    await c.post_rx(8)
    buf = h.t.alloc_host_mem(0x10000)
    harvested = {vf.index: set() for vf in vfs[:2]}
    sent = []
    for k in range(6):
        for n in (60, 1514, 300):
            f = frame(b.mac, a.mac, n, rnd)
            sent.append(f)
            await a.send(f)
        off, size = rnd.randrange(0, 0x8000), rnd.choice((4, 100, 4096, 9000))
        idx = await q.post(buf + off, rnd.randrange(0, 0x1000) & ~7, size, to_host=True)
        assert await q.wait(idx) == DescStatus.DONE
        await a.send(frame(c.mac, a.mac, 64, rnd))
        for vf in vfs[:2]:                          # a pass of the migration, mid-traffic
            harvested[vf.index] |= await log.harvest(vf.index)
    got = await receive_n(b, len(sent))
    assert got == sent
    assert len(await receive_n(c, 6)) == 6
    await a.reap_tx()
    await ClockCycles(dut.clk, 200)                 # the last marks land
    for vf in vfs[:2]:
        harvested[vf.index] |= await log.harvest(vf.index)
        written = wire.pages.get(vf.index, set())
        assert written, f"VF{vf.index} wrote nothing on the wire"
        missed = written - harvested[vf.index]
        assert not missed, f"VF{vf.index}: pages written but not logged: {sorted(map(hex, missed))}"
        groups = {p >> 15 for p in written}         # a mark covers its byte: 8 pages
        stray = {p for p in harvested[vf.index] if p >> 15 not in groups}
        assert not stray, f"VF{vf.index}: pages logged that no write touched: {sorted(map(hex, stray))}"
        assert not await log.overflow(vf.index)
        dut._log.info("dirty log VF%d: %d pages written, %d logged (%d extra: the byte's "
                      "neighbours)", vf.index, len(written), len(harvested[vf.index]),
                      len(harvested[vf.index] - written))
    assert all(v == 0xFF for _, v in wire.marks)
    assert len(wire.marks) == await log.marks()
    assert wire.pages.get(vfs[2].index), "VF3 wrote nothing"
    logged_tlps = len(wire.marks)
    # VF3's writes cost no mark: every mark falls in VF1's or VF2's bitmap
    bitmaps = {log.logs[vf.index][0] for vf in vfs[:2]}
    assert all(any(0 <= addr - bm < pages // 8 for bm in bitmaps) for addr, _ in wire.marks)
    # a bitmap too small: VF1's next write lands past it, the overflow bit says so
    await log.stop(vfs[0].index)
    await log.start(vfs[0].index, first, 1)          # page 0 only
    idx = await q.post(buf, 0, 64, to_host=True)
    assert await q.wait(idx) == DescStatus.DONE
    await ClockCycles(dut.clk, 50)
    assert await log.overflow(vfs[0].index, clear=True)
    assert not await log.overflow(vfs[0].index), "writing CTRL bit 1 did not clear the overflow"
    assert not await log.overflow(vfs[1].index)
