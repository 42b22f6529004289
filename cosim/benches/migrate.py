"""VF state save / restore on the card (issue 7, first part): quiesce a VF with traffic,
export its virtio state, lose it, import it back, resume; the guest's queues go on where they
stopped."""

import random

import cocotb
from cocotb.triggers import ClockCycles

from hdl.params import VirtioRegs as V, MigRegs as MG, NetRegs
from host_driver.vf_state import CardVfState, VfStateError
from cosim.benches.virtio import bring_up, net, frame, receive_n


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
    st = CardVfState(h.drv)
    await st.quiesce(vfs[0])
    blob = await st.export_state(vfs[0])
    parsed = st.parse(blob)
    assert parsed["queues"][1][6] == len(first) and parsed["queues"][1][7] == len(first)
    assert parsed["status"] & V.S_DRIVER_OK
    # a stopped function takes no new transmit
    pending = frame(b.mac, a.mac, 128, rnd)
    await a.send(pending)
    tx0 = await h.drv.mgmt_read(NetRegs.TX_FRAMES)
    await ClockCycles(dut.clk, 3000)
    assert await h.drv.mgmt_read(NetRegs.TX_FRAMES) == tx0
    # lose the state: a virtio reset clears the device's indices
    await a.access.write(V.COMMON + V.STATUS, 0, 1)
    await h.drv.mgmt_write(MG.SEL, vfs[0].index)
    assert await h.drv.mgmt_read(MG.TX_AVAIL) == 0
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
    assert again == blob, "the restored state differs from the saved one"
    await st.resume(vfs[0])
    rest = [frame(b.mac, a.mac, n, rnd) for n in (100, 1500, 61)]
    for f in rest:
        await a.send(f)
    assert await receive_n(b, 1 + len(rest)) == [pending] + rest
    assert await a.reap_tx() == 1 + len(rest)
