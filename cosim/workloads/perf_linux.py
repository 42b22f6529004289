"""``make bench``: Linux guests on the card (one cocotb test, figures into ``OFFCARD_BENCH_OUT``).

Two Debian guests on VF1 and VF2: boot to eth0 up (wall s); 20 pings of 56 bytes from VF1 to
the uplink peer (round trip in simulated µs, from the transmit notification to the receive
interrupt, and in wall ms as the guest's ping measures it); 256 KiB over TCP from VF1 to VF2
(frames through the card per wall second, payload bytes per simulated clock)."""

import statistics

import cocotb

from cosim.workloads import bench_out
from cosim.scenarios.guest_rig import CardRig, PEER_IP
from cosim.scenarios.linux import sim_rtts_us, transfer, TRANSFER_KIB, ping_summary
from cosim.scenarios.virtio import counters


@cocotb.test()
async def test_perf_linux(dut):
    rig = await CardRig(dut, [1, 2]).start()
    try:
        g1 = await rig.boot(1)
        g2 = await rig.boot(2)
        await rig.run(1, f"ping -c 1 -W 5 {PEER_IP}")           # (ARP)
        be = rig.card.backends[1]
        mark = len(be.trace)
        rc, out = await rig.run(1, f"ping -c 20 -i 0.2 -W 5 {PEER_IP}", timeout_s=300)
        tx, rx, avg_ms = ping_summary(out)
        rtts = sim_rtts_us(be.trace[mark:])
        c0 = await counters(rig.h)
        md5_a, md5_b, size, wall, cycles = await transfer(rig, 1, 2)
        c1 = await counters(rig.h)
        frames = c1["TX_FRAMES"] - c0["TX_FRAMES"]
        row = {"guest_boot_s": round((g1.boot_s + g2.boot_s) / 2, 2),
               "ping_replies": f"{rx}/{tx}", "ping_rtt_wall_ms": avg_ms,
               "ping_rtt_sim_us_median": round(statistics.median(rtts), 3) if rtts else None,
               "ping_rtt_sim_us_max": round(max(rtts), 3) if rtts else None,
               "transfer_kib": TRANSFER_KIB, "transfer_exact": md5_a == md5_b and
               size == TRANSFER_KIB * 1024, "transfer_wall_s": round(wall, 2),
               "transfer_frames": frames, "frames_per_wall_s": round(frames / wall, 1),
               "payload_bytes_per_clk": round(size / cycles, 4),
               "transfer_cycles": cycles}
    finally:
        rig.close()
    dut._log.info("linux guests: %s", row)
    bench_out(row)
