"""My bench: the card enumerated by the host driver, a DMA round trip, a frame from VF1 to VF2."""

import random

import cocotb

from host_driver.dma import DmaQueue
from cosim.scenarios.card import bring_up
from cosim.scenarios.virtio import frame, net, receive_n


@cocotb.test()
async def test_enumerate(dut):
    """The host driver finds the PF and enables two VFs, each with its own requester ID."""
    h, pf, vfs = await bring_up(dut, num_vfs=2)       # clock, reset, probe, SR-IOV
    assert [vf.index for vf in vfs] == [1, 2]
    assert len({pf.rid, vfs[0].rid, vfs[1].rid}) == 3
    dut._log.info("PF %#06x, VFs %s", pf.rid, [hex(vf.rid) for vf in vfs])


@cocotb.test()
async def test_dma_round_trip(dut):
    """512 bytes from host memory into card memory and back to another host buffer, through
    the PF's DMA descriptor ring."""
    h, pf, _ = await bring_up(dut, num_vfs=0)
    q = await DmaQueue(pf, entries=8).setup()
    src, dst = h.t.alloc_host_mem(4096), h.t.alloc_host_mem(4096)   # the host's memory
    data = bytes(range(256)) * 2
    await h.t.host_write(src, data)
    await q.transfer(src, 0x100, len(data), to_host=False)   # host -> card memory at 0x100
    await q.transfer(dst, 0x100, len(data), to_host=True)    # card memory at 0x100 -> host
    assert await h.t.host_read(dst, len(data)) == data


@cocotb.test()
async def test_frame_from_vf1_to_vf2(dut):
    """A virtio-net driver on VF1 and one on VF2: a 100-byte frame from VF1 reaches VF2
    through the card's switch, byte exact."""
    h, pf, vfs = await bring_up(dut, num_vfs=2)
    vf1, vf2 = await net(h, vfs[0]), await net(h, vfs[1])   # probe, features, rings, DRIVER_OK
    await vf2.post_rx(4)                                      # four receive buffers
    sent = frame(vf2.mac, vf1.mac, 100, random.Random(1))    # destination, source, length
    await vf1.send(sent)
    assert await receive_n(vf2, 1) == [sent]
