"""``make bench`` workload: DMA throughput through the card, and I/O page fault latency.

Throughput: for each size, one descriptor host->card and one card->host, from the PF
(untranslated) and from a VF whose domain has every page present (translated through the
device TLB, cut at 4 KiB pages). Reported per row:

* ``stream_bytes_per_clk``: payload bytes over the clocks from the first to the last beat of
  the transfer's payload TLPs (card->host: the card's MemWr; host->card: the completions of
  the DMA read channel's requests, whose tags are ``DMA_READ_TAGS``; the descriptor fetch's
  completion comes before the payload and is not part of the stream), and ``stream_fraction_of_limit``, that over the stream limit (``data_width/8``
  bytes per clock: the header rides beside the data, so every beat of a payload TLP carries
  payload);
* ``e2e_bytes_per_clk``: payload bytes over the clocks from the doorbell to the status write
  (descriptor fetch, host latency and status included).

Page faults: 1 KiB writes to absent pages, serviced by :class:`host_driver.iommu.FaultService`
on its interrupt. Per fault, in card clocks: ``raise_clk`` (doorbell to the IOPF entry on the
wire: descriptor fetch, walk, staging copy, FBQ entry), ``host_clk`` (IOPF entry to the CQ
doorbell reaching the card: the host model's service time), ``resolve_clk`` (CQ doorbell to the
last replayed payload byte: CQ fetch, descriptor refetch, walk, replay) and ``total_clk``.

Writes JSON ``{"dma": [...], "page_faults": [...]}`` to ``OFFCARD_BENCH_OUT``.
"""

import time

import cocotb

from cosim.workloads import bench_out
from regmap import FaultRegs, DescStatus
from hdl.pcie.host_port import DMA_READ_TAGS
from host_driver.dma import DmaQueue
from host_driver.iommu import Iommu, FaultService, PAGE_SIZE
from cosim.harness import CardHarness, CLOCK_NS
from cosim.scenarios.dma import set_mps_mrrs

SIZES = [64, 256, 4096, 65536]
MPS, MRRS = 256, 512


class Spans:
    """Payload TLP spans on both sides of the link."""

    def __init__(self, h):
        self.tx = []
        self.rx = []
        h.bridge.tx_hook = self.on_tx
        h.bridge.rx_hook = self.on_rx

    def on_tx(self, hdr, payload, t0, t1):
        if hdr[0] in (0x40, 0x60) and len(payload) > 4:           # MemWr 3/4 DW with data
            self.tx.append((t0, t1, len(payload)))

    def on_rx(self, tlp, t0, t1):
        if tlp.fmt_type.name == "CPL_DATA" and tlp.tag in DMA_READ_TAGS:
            self.rx.append((t0, t1, tlp.length * 4))

    def clear(self):
        self.tx.clear()
        self.rx.clear()


async def throughput(h, q, buf, W, label, spans):
    rows = []
    for size in SIZES:
        for to_host in (False, True):
            spans.clear()
            t0 = h.t.now_ns()
            idx = await q.post(buf, 0, size, to_host=to_host)
            assert await q.wait(idx, poll_ns=CLOCK_NS) == DescStatus.DONE
            t1 = h.t.now_ns()
            rec = {"path": label, "direction": "card_to_host" if to_host else "host_to_card",
                   "bytes": size, "data_width": W, "mps": MPS, "mrrs": MRRS,
                   "e2e_bytes_per_clk": round(size / ((t1 - t0) / CLOCK_NS), 3)}
            s = spans.tx if to_host else spans.rx
            if s:
                clocks = (s[-1][1] - s[0][0]) / CLOCK_NS + 1
                rec["stream_bytes_per_clk"] = round(size / clocks, 3)
                rec["stream_fraction_of_limit"] = round(size / clocks / (W / 8), 3)
            rows.append(rec)
    return rows


async def fault_latency(h, q, dom, fs, n=8):
    """``n`` writes of 1 KiB, each to a page that is not present."""
    cq_doorbell = []
    iopf_on_wire = []
    last_payload = []
    iopf_lo, iopf_hi = fs.iopf.base, fs.iopf.base + 16 * fs.iopf.entries
    cq_addr = h.drv.bar2 + FaultRegs.CQ_PROD

    def on_tx(hdr, payload, t0, t1):
        if hdr[0] in (0x40, 0x60):
            addr = int.from_bytes(hdr[8:16] if hdr[0] & 0x20 else hdr[8:12], "big")
            if iopf_lo <= addr < iopf_hi:
                iopf_on_wire.append(t0)
            elif len(payload) > 4:
                last_payload.append(t1)

    def on_rx(tlp, t0, t1):
        if tlp.fmt_type.name.startswith("MEM_WRITE") and tlp.address == cq_addr:
            cq_doorbell.append(t1)

    h.bridge.tx_hook = on_tx
    h.bridge.rx_hook = on_rx
    stop = [False]
    svc = cocotb.start_soon(fs.run(lambda: stop[0], timeout_ns=20_000))
    rows = []
    for k in range(n):
        iova = (16 + k) * PAGE_SIZE + 0x100
        cq_doorbell.clear(), iopf_on_wire.clear(), last_payload.clear()
        t0 = h.t.now_ns()
        idx = await q.post(iova, 0x1000, 1024, to_host=True)
        assert await q.wait(idx, poll_ns=CLOCK_NS) == DescStatus.DONE
        assert len(iopf_on_wire) == 1 and len(cq_doorbell) == 1, (iopf_on_wire, cq_doorbell)
        t_iopf, t_cq, t_end = iopf_on_wire[0], cq_doorbell[0], last_payload[-1]
        rows.append({"fault": k, "raise_clk": round((t_iopf - t0) / CLOCK_NS),
                     "host_clk": round((t_cq - t_iopf) / CLOCK_NS),
                     "resolve_clk": round((t_end - t_cq) / CLOCK_NS),
                     "total_clk": round((t_end - t0) / CLOCK_NS)})
    stop[0] = True
    await svc
    assert (await fs.counters())["faults"] == n
    return rows


@cocotb.test()
async def test_dma_throughput(dut):
    h = CardHarness(dut)
    wall0 = time.perf_counter()
    await h.start()
    c0 = h.cycles()
    pf = await h.drv.probe()
    await pf.setup_msix()
    vf = (await h.drv.enable_sriov(1))[0]
    await set_mps_mrrs(pf, MPS, MRRS)
    W = h.data_width
    spans = Spans(h)
    buf = (h.t.alloc_host_mem(0x20000) + 0xFFF) & ~0xFFF
    await h.t.host_write(buf, bytes(range(256)) * 256)
    rows = await throughput(h, await DmaQueue(pf, entries=16).setup(), buf, W, "pf_untranslated",
                            spans)
    # the VF through its domain: IOVA 0 .. 64 KiB on the same bus pages, all present
    iommu = Iommu(h.drv)
    dom = await iommu.attach(vf.index, vm=1, pages=64)
    await dom.map(0, 0x10000, bus=buf)
    vq = await DmaQueue(vf, entries=16).setup()
    rows += await throughput(h, vq, 0, W, "vf_translated", spans)
    dom.allow(0, 64 * PAGE_SIZE)
    fs = FaultService(iommu)
    await fs.setup(0)
    faults = await fault_latency(h, vq, dom, fs)
    cycles, wall = h.cycles() - c0, time.perf_counter() - wall0
    for r in rows:
        r["workload_cycles_per_s"] = round(cycles / wall)
        dut._log.info("dma bench: %s", r)
    for r in faults:
        dut._log.info("page fault bench: %s", r)
    dut._log.info("dma bench: %d cycles in %.2f s wall: %d cycles/s", cycles, wall, cycles / wall)
    bench_out({"dma": rows, "page_faults": faults})
