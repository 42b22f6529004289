"""Random and malformed TLPs straight into the card's rx stream (hypothesis-generated).

The card's output is diverted from the root complex to the bench, which checks per batch:
no hang (the bench drains and the card answers a normal request afterwards), exactly one
completion per non-posted request (matched by tag, with the request's requester ID echoed),
none for posted requests, and that the error counters moved.
"""

import os
import random

import cocotb
from cocotb.queue import Queue
from cocotb.triggers import ClockCycles, First, Timer

from regmap import MgmtRegs
from hdl.pcie.tlp import TlpKind
from cosim.harness import CardHarness
from cosim.tlpgen import generate_cases, case_beats

N_CASES = int(os.environ.get("OFFCARD_FUZZ_CASES", "1000"))
BATCH = 100


@cocotb.test()
async def test_fuzz_tlps(dut):
    h = CardHarness(dut)
    await h.start()
    pf = await h.drv.probe()
    cnt0 = {n: await h.drv.mgmt_read(o) for n, o in
            (("malformed", MgmtRegs.ERR_MALFORMED), ("unsupported", MgmtRegs.ERR_UNSUPPORTED),
             ("rx", MgmtRegs.RX_TLPS))}
    cases = generate_cases(N_CASES, seed=int(os.environ.get("OFFCARD_FUZZ_SEED", "1")), batch=BATCH)
    out = Queue()
    h.bridge.divert = out
    expected_np = 0
    got_cpl = 0
    n_malformed = 0
    for start in range(0, len(cases), BATCH):
        batch = cases[start:start + BATCH]
        want = {}
        for k, c in enumerate(batch):
            c["tag"] = k                    # unique within the batch
            if c["non_posted"] and c["has_sop"]:
                want[k] = c["requester_id"]
            n_malformed += c["malformed_hint"]
            h.bridge.send_beats(case_beats(c, h.bridge.codec))
        # drain: the bridge empties its queue and the card goes quiet
        await First(h.bridge.idle.wait(), Timer(5_000_000, "ns"))
        assert h.bridge.idle.is_set(), f"card stopped taking beats in batch at case {start}"
        await ClockCycles(dut.clk, 200)
        seen = {}
        while not out.empty():
            hdr, payload = out.get_nowait()
            ftype = hdr[0]
            assert ftype in (TlpKind.CPL, TlpKind.CPLD, TlpKind.CPLLK), \
                f"unexpected TLP from card: {hdr.hex()}"
            tag = hdr[10] | ((hdr[1] >> 3 & 1) << 8) | ((hdr[1] >> 7 & 1) << 9)
            req_id = int.from_bytes(hdr[8:10], "big")
            assert tag in want, f"completion for tag {tag} that is not an outstanding request"
            assert req_id == want[tag], f"tag {tag}: requester ID {req_id:04x} != {want[tag]:04x}"
            seen[tag] = seen.get(tag, 0) + 1
        missing = sorted(set(want) - set(seen))
        dup = sorted(t for t, n in seen.items() if n != 1)
        assert not missing, f"batch {start}: no completion for tags {missing[:10]}"
        assert not dup, f"batch {start}: more than one completion for tags {dup[:10]}"
        expected_np += len(want)
        got_cpl += sum(seen.values())
    h.bridge.divert = None
    # random config writes may have moved the PF's BARs or decode: put them back
    for off in (0x10, 0x14, 0x18):
        await pf.write32(off, {0x10: pf.bars[0].addr & 0xFFFF_FFFF, 0x14: pf.bars[0].addr >> 32,
                               0x18: pf.bars[2].addr}[off])
    await pf.set_command(mem=True, master=True)
    # the card still works through the root complex
    assert await pf.read32(0) == 0x1041_1AF4
    cnt1 = {n: await h.drv.mgmt_read(o) for n, o in
            (("malformed", MgmtRegs.ERR_MALFORMED), ("unsupported", MgmtRegs.ERR_UNSUPPORTED),
             ("rx", MgmtRegs.RX_TLPS))}
    assert cnt1["malformed"] - cnt0["malformed"] >= n_malformed // 2, (cnt0, cnt1, n_malformed)
    assert cnt1["unsupported"] > cnt0["unsupported"]
    assert cnt1["rx"] - cnt0["rx"] >= sum(c["has_sop"] for c in cases)
    assert got_cpl == expected_np
    dut._log.info("fuzz: %d TLPs, %d non-posted answered once each, malformed counter +%d",
                  len(cases), expected_np, cnt1["malformed"] - cnt0["malformed"])
