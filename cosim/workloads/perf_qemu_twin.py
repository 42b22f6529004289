"""``make bench``: QEMU's live migration of a running Linux guest from card A to card B on the
two-card top, driven by the seed-004 orchestrator with each host's switch on its PF (one
cocotb test, figures into ``OFFCARD_BENCH_OUT``; the same figures as
:mod:`cosim.workloads.perf_qemu_migration`, plus the frames A's switch forwarded to B)."""

import cocotb

from cosim.workloads import bench_out
from cosim.scenarios.guest_rig import TwinRig, PEER_IP
from cosim.scenarios.qemu_migration import orchestrated_migration

PINGS = 60


@cocotb.test()
async def test_perf_qemu_twin(dut):
    rig = await TwinRig(dut, [1], [1]).start()
    try:
        await rig.a.boot(1, qmp=True)
        await rig.a.run(1, f"ping -c 1 -W 5 {PEER_IP}")         # (ARP)
        _, row = await orchestrated_migration(dut._log, rig, PINGS)
    finally:
        rig.close()
    dut._log.info("QEMU live migration between cards: %s", row)
    bench_out(row)
