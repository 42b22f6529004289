"""``make bench``: QEMU's own live migration of a running Linux guest from VF1 to VF2 (one
cocotb test, figures into ``OFFCARD_BENCH_OUT``).

The guest pings the uplink peer every 100 ms while QEMU migrates it (QMP, ``-incoming`` on
loopback) from the QEMU on VF1's socket to one on VF2's, the card marking QEMU's dirty log for
VF1. Reported: QEMU's total time and downtime (wall ms, as ``query-migrate`` gives them), the
card's pause (simulated µs from VF1's stop to VF2's rings up), the pages VF1 wrote while the
card logged it and the pages its marks cover, and the pings sent and lost."""


import cocotb

from cosim.workloads import bench_out
from cosim.scenarios.dirty import WireWrites
from cosim.scenarios.guest_rig import CardRig, PEER_IP
from cosim.scenarios.linux import ping_start, ping_summary, ping_wait
from cosim.scenarios.qemu_migration import migrate

PINGS = 60


@cocotb.test()
async def test_perf_qemu_migration(dut):
    rig = await CardRig(dut, [1, 2]).start()
    try:
        await rig.boot(1, qmp=True)
        wire = WireWrites(rig.h)
        await rig.run(1, f"ping -c 1 -W 5 {PEER_IP}")           # (ARP)
        await rig.run(1, ping_start(PEER_IP, PINGS, 0.1))
        st = await migrate(dut._log, rig, 1, 2, wire)
        rc, out = await rig.run(2, ping_wait(PINGS * 0.1 + 30), timeout_s=PINGS * 0.1 + 90)
        sent, got, _ = ping_summary(out)
        row = {"qemu_total_ms": st.get("total-time"), "qemu_downtime_ms": st.get("downtime"),
               "card_pause_us": st["card_pause_us"], "pages_written": st["pages_written"],
               "pages_logged": st["pages_logged"], "pings_sent": sent, "pings_lost": sent - got}
    finally:
        rig.close()
    dut._log.info("QEMU live migration: %s", row)
    bench_out(row)
