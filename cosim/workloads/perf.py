"""Workload for ``make bench``: enumeration, SR-IOV and MMIO traffic, timed.

Writes a JSON record (simulated cycles, wall seconds, MMIO operations) to the file named by
``OFFCARD_BENCH_OUT``. Nothing here asserts on time; the checks are functional only.
"""

import os
import time

import cocotb

from cosim.workloads import bench_out
from regmap import FuncRegs
from cosim.harness import CardHarness

MMIO_ROUNDS = int(os.environ.get("OFFCARD_BENCH_ROUNDS", "20"))


@cocotb.test()
async def test_enum_mmio_workload(dut):
    h = CardHarness(dut)
    wall0 = time.perf_counter()
    await h.start()
    c0 = h.cycles()
    pf = await h.drv.probe()
    vfs = await h.drv.enable_sriov(min(16, h.drv.sriov.total_vfs if h.drv.sriov else 16))
    ops = 0
    for r in range(MMIO_ROUNDS):
        for f in [pf] + vfs:
            await f.reg_write(FuncRegs.SCRATCH, r ^ f.index)
            ops += 1
        for f in [pf] + vfs:
            assert await f.reg_read(FuncRegs.SCRATCH) == r ^ f.index
            ops += 1
    cycles = h.cycles() - c0
    wall = time.perf_counter() - wall0
    rec = {"workload": "enumerate + 16 VFs + MMIO", "sim_cycles": cycles, "wall_s": round(wall, 3),
           "cycles_per_s": round(cycles / wall), "mmio_ops": ops,
           "tlps_to_card": h.bridge.tlps_in, "tlps_from_card": h.bridge.tlps_out}
    dut._log.info("bench: %s", rec)
    bench_out(rec)
