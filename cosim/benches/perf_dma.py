"""``make bench`` workload: DMA throughput through the card, in both directions.

For each size, one descriptor host->card and one card->host. Reported per direction:
* ``stream_bytes_per_clk``: payload bytes over the clocks from the first to the last beat of
  the transfer's MemWr TLPs (card->host), and that as a fraction of the stream limit (``data_width/8`` bytes per clock:
  the header rides beside the data, so payload beats are all beats);
* ``e2e_bytes_per_clk``: payload bytes over the clocks from the doorbell to the status write
  (descriptor fetch, host latency and status included).
Writes JSON to ``OFFCARD_BENCH_OUT``.
"""

import json
import os
import time

import cocotb

from host_driver.dma import DmaQueue
from cosim.harness import CardHarness, CLOCK_NS
from cosim.benches.dma import set_mps_mrrs

SIZES = [64, 256, 4096, 65536]


@cocotb.test()
async def test_dma_throughput(dut):
    h = CardHarness(dut)
    wall0 = time.perf_counter()
    await h.start()
    c0 = h.cycles()
    pf = await h.drv.probe()
    await set_mps_mrrs(pf, 256, 512)
    q = await DmaQueue(pf, entries=16).setup()
    buf = (h.t.alloc_host_mem(0x20000) + 0xFFF) & ~0xFFF
    await h.t.host_write(buf, bytes(range(256)) * 256)
    W = h.data_width
    spans = []

    def hook(hdr, payload, t0, t1):
        kind = hdr[0]
        if kind in (0x40, 0x60, 0x4A) and len(payload) > 4:      # MemWr 3/4DW, CplD
            spans.append((t0, t1, len(payload)))

    h.bridge.tx_hook = hook
    rows = []
    for size in SIZES:
        for to_host in (False, True):
            spans.clear()
            t0 = h.t.now_ns()
            idx = await q.post(buf, 0, size, to_host=to_host)
            assert await q.wait(idx, poll_ns=CLOCK_NS) == 1
            t1 = h.t.now_ns()
            rec = {"direction": "card_to_host" if to_host else "host_to_card", "bytes": size,
                   "data_width": W, "mps": 256, "mrrs": 512,
                   "e2e_bytes_per_clk": round(size / ((t1 - t0) / CLOCK_NS), 3)}
            if to_host and spans:
                clocks = (spans[-1][1] - spans[0][0]) / CLOCK_NS + 1
                rec["stream_bytes_per_clk"] = round(size / clocks, 3)
                rec["stream_fraction_of_limit"] = round(size / clocks / (W / 8), 3)
            rows.append(rec)
            dut._log.info("dma bench: %s", rec)
    cycles, wall = h.cycles() - c0, time.perf_counter() - wall0
    for r in rows:
        r["workload_cycles_per_s"] = round(cycles / wall)
    dut._log.info("dma bench: %d cycles in %.2f s wall: %d cycles/s", cycles, wall, cycles / wall)
    out = os.environ.get("OFFCARD_BENCH_OUT")
    if out:
        with open(out, "w") as f:
            json.dump(rows, f)
