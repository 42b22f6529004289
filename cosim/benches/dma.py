"""DMA through the card: host -> card memory -> host, byte exact, at many sizes and alignments,
for several Max Payload Size / Max Read Request Size settings, with split completions."""

import os
import random

import cocotb

from host_driver.dma import DmaQueue, DescStatus
from host_driver.pci import CAP_PCIE
from cosim.harness import CardHarness

GUARD = 16


async def set_mps_mrrs(pf, mps, mrrs):
    off = pf.caps[CAP_PCIE] + 8
    v = await pf.read16(off)
    v = (v & ~0x70E0) | ((mps.bit_length() - 8) << 5) | ((mrrs.bit_length() - 8) << 12)
    await pf.write16(off, v)


async def roundtrip(h, q, src, dst, length, hoff, card, doff, rnd):
    """host src+hoff -> card -> host dst+doff; checks the bytes and the guards around them."""
    payload = bytes(rnd.getrandbits(8) for _ in range(length))
    await h.t.host_write(src + hoff, payload)
    fill = bytes([0xA5]) * (length + 2 * GUARD)
    await h.t.host_write(dst + doff - GUARD, fill)
    await q.transfer(src + hoff, card, length, to_host=False)
    await q.transfer(dst + doff, card, length, to_host=True)
    got = await h.t.host_read(dst + doff - GUARD, length + 2 * GUARD)
    if got[GUARD:GUARD + length] != payload:
        bad = [i for i in range(length) if got[GUARD + i] != payload[i]]
        raise AssertionError(f"len {length} hoff {hoff} card {card:#x} doff {doff}: "
                             f"{len(bad)} bytes differ, first at {bad[0]}, last at {bad[-1]}")
    assert got[:GUARD] == fill[:GUARD] and got[GUARD + length:] == fill[:GUARD], \
        f"len {length} hoff {hoff} card {card:#x} doff {doff}: bytes outside the buffer written"


async def _setup(dut, split):
    h = CardHarness(dut)
    await h.start()
    h.rc.split_on_all_rcb = split
    pf = await h.drv.probe()
    q = await DmaQueue(pf, entries=16).setup()
    src = (h.t.alloc_host_mem(0x20000) + 0xFFF) & ~0xFFF
    dst = (h.t.alloc_host_mem(0x20000) + 0xFFF) & ~0xFFF
    return h, pf, q, src, dst


@cocotb.test()
async def test_dma_sizes_alignments(dut):
    """1 B .. 8 KiB at every byte alignment (host offsets 0..7 and near 4 KiB), MPS/MRRS sets."""
    h, pf, q, src, dst = await _setup(dut, split=True)
    rnd = random.Random(7)
    sizes = [1, 2, 3, 4, 5, 7, 8, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 513,
             1000, 4095, 4096, 4097, 8191]
    combos = [(128, 128), (256, 512), (512, 4096)]
    if os.environ.get("OFFCARD_DMA_QUICK"):
        sizes, combos = [4096], [(128, 128)]
    for mps, mrrs in combos:
        await set_mps_mrrs(pf, mps, mrrs)
        for length in sizes:
            for hoff in (0, 1, 2, 3, 5, 6, 7, 4093):
                card = (rnd.randrange(0, 0x10000 - length - 8) & ~3) | (hoff & 3)
                doff = (rnd.randrange(0, 64) & ~3) | (hoff & 3) + 64
                await roundtrip(h, q, src, dst, length, hoff, card, doff, rnd)
    dut._log.info("dma: %d transfers byte exact", 2 * len(combos) * len(sizes) * 8)


@cocotb.test()
async def test_dma_64k(dut):
    """The whole 64 KiB card memory in one descriptor each way, unsplit and split completions."""
    for split in (False, True):
        h, pf, q, src, dst = await _setup(dut, split=split)
        await set_mps_mrrs(pf, 256, 4096 if not split else 512)
        await roundtrip(h, q, src, dst, 65536, 0, 0, 64, random.Random(split))


@cocotb.test()
async def test_dma_bad_descriptors(dut):
    """Bad descriptors get a bad-descriptor status and move nothing."""
    h, pf, q, src, dst = await _setup(dut, split=False)
    await h.t.host_write(dst, bytes(64))
    for host, card, length in ((dst, 0, 0), (dst, 0, 65537), (dst, 0xFFF0, 32), (dst + 1, 0, 8)):
        idx = await q.post(host, card, length, to_host=True)
        assert await q.wait(idx) == DescStatus.BAD_DESC
    assert await h.t.host_read(dst, 64) == bytes(64)
    assert await q.consumed() == 4


@cocotb.test()
async def test_dma_from_vfs(dut):
    """Each VF runs its own ring with its own requester ID; a VF without Bus Master Enable
    moves nothing until it gets it."""
    h = CardHarness(dut)
    await h.start()
    pf = await h.drv.probe()
    vfs = await h.drv.enable_sriov(4)
    rids = {}

    def hook(hdr, payload, t0, t1):
        if hdr[0] in (0x00, 0x20, 0x40, 0x60):                  # MemRd / MemWr, 3 or 4 DW
            rids.setdefault(int.from_bytes(hdr[4:6], "big"), 0)
            rids[int.from_bytes(hdr[4:6], "big")] += 1

    h.bridge.tx_hook = hook
    rnd = random.Random(11)
    src = (h.t.alloc_host_mem(0x10000) + 0xFFF) & ~0xFFF
    dst = (h.t.alloc_host_mem(0x10000) + 0xFFF) & ~0xFFF
    for n, vf in ((1, vfs[0]), (3, vfs[2])):
        q = await DmaQueue(vf, entries=8).setup()
        await roundtrip(h, q, src, dst, 3000 + n, n, 0x1000 * n + n, 64 + n, rnd)
        assert rids.get(vf.rid, 0) > 0, f"no TLP with VF{n}'s requester ID {vf.rid:#06x}"
    assert set(rids) == {vfs[0].rid, vfs[2].rid}, {hex(r): c for r, c in rids.items()}
    # bus mastering off: the descriptor waits, nothing is fetched
    vf = vfs[3]
    await vf.set_command(master=False)
    q = await DmaQueue(vf, entries=8).setup()
    before = dict(rids)
    idx = await q.post(dst, 0, 64, to_host=True)
    await h.t.sleep_ns(20_000)
    assert await q.status(idx) == 0 and rids == before
    await vf.set_command(master=True)
    assert await q.wait(idx) == DescStatus.DONE
    assert rids.get(vf.rid, 0) > 0
