"""One workload whose every TLP is recorded, to compare the two ways TLPs cross between Python
and the RTL (``OFFCARD_TLP_PATH``: whole TLPs through the TLP shim, or one beat at a time).

The workload waits for each step before the next (enumeration and SR-IOV, MMIO reads and
writes, MSI-X, DMA both ways at several sizes and offsets, a virtio-net frame from VF1 to VF2),
so the TLPs of each function come in one order whatever the path's timing (two functions'
engines may interleave differently: the test compares each function's own sequence). Each TLP is
recorded as ``[direction, header hex, payload hex]`` and the list is written as JSON to
``OFFCARD_TLP_LOG`` (when set); ``tests/test_cosim_paths.py`` runs the bench on both paths and
compares the lists.
"""

import json
import os
import random

import cocotb

from host_driver.dma import DmaQueue
from cosim.scenarios.card import bring_up
from cosim.scenarios.dma import set_mps_mrrs
from cosim.scenarios.virtio import frame, net, receive_n


@cocotb.test()
async def test_record_every_tlp(dut):
    """Enumeration, MMIO, MSI-X, DMA and a virtio-net frame, every TLP recorded."""
    log = []
    h, pf, vfs = await bring_up(dut, num_vfs=2)
    h.bridge.rx_hook = lambda tlp, t0, t1: log.append(
        ["to_card", bytes(tlp.pack_header()).hex(),
         (tlp.get_data() if tlp.has_data() else b"").hex()])
    h.bridge.tx_hook = lambda hdr, payload, t0, t1: log.append(
        ["to_host", hdr.hex(), payload.hex()])
    rnd = random.Random(5)
    # MMIO: the scratch register of each function, written and read back
    for k, fn in enumerate([pf, *vfs]):
        await fn.reg_write(0x08, 0x1234_5600 + k)
        assert await fn.reg_read(0x08) == 0x1234_5600 + k
    # MSI-X: one message from the PF
    vecs = await pf.setup_msix()
    await pf.msix_mask(0, False)
    await pf.trigger_irq(0)
    assert await h.t.wait_msi(vecs[0], 1, 20_000)
    # DMA both ways: sizes and byte offsets, split by MPS / MRRS
    await set_mps_mrrs(pf, 128, 256)
    q = await DmaQueue(pf, entries=8).setup()
    src, dst = h.t.alloc_host_mem(16384), h.t.alloc_host_mem(16384)
    for length, hoff, coff in ((1, 0, 0), (7, 3, 5), (64, 0, 0), (300, 2, 6), (4096, 0, 0),
                               (5000, 1, 3)):
        data = bytes(rnd.getrandbits(8) for _ in range(length))
        await h.t.host_write(src + hoff, data)
        await q.transfer(src + hoff, 0x200 + coff, length, to_host=False)
        await q.transfer(dst + hoff, 0x200 + coff, length, to_host=True)
        assert await h.t.host_read(dst + hoff, length) == data
    # virtio-net: one frame from VF1 to VF2
    a, b = await net(h, vfs[0]), await net(h, vfs[1])
    await b.post_rx(2)
    sent = frame(b.mac, a.mac, 200, rnd)
    await a.send(sent)
    assert await receive_n(b, 1) == [sent]
    # the engines' last reads (an available index checked again after the frame) come a few
    # hundred clocks after the frame, later on the slower path: wait until the card is quiet
    await h.settle(cycles=2000)
    h.bridge.rx_hook = h.bridge.tx_hook = None
    dut._log.info("%d TLPs recorded (%d to the card, %d from it)", len(log),
                  sum(1 for r in log if r[0] == "to_card"), sum(1 for r in log if r[0] == "to_host"))
    out = os.environ.get("OFFCARD_TLP_LOG")
    if out:
        with open(out, "w") as f:
            json.dump(log, f)
