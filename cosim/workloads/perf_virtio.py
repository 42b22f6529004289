"""``make bench`` workload: virtio-net frames between two guests through the card.

For 64-byte and 1500-byte frames, guest 1 (VF1) sends ``N`` frames to guest 2 (VF2), both in
direct mode and both in trap mode; direct mode once more with the host's memory answering the
card's reads 1 us late (``host_read_ns``, :attr:`cosim.bridge._Bridge.read_latency_ns`), a
server's figure. Each frame goes out as two descriptors (header, frame: ``tx_descs`` 2); the
direct rows again with the header pushed in front of the frame in one descriptor
(``tx_descs`` 1), the layout Linux's virtio_net uses when a packet has the headroom. Reported per row: frames per second of wall time, payload bytes per simulated
clock (frame bytes over the clocks from the first send to the last frame received) and clocks
per frame, and the hypervisor traps taken. Then the uplink both ways (``vf_to_uplink``: VF1
sends to an address no function has; ``uplink_to_vf``: frames from the uplink port for VF2),
with 0 and 1000 ns. Writes JSON to ``OFFCARD_BENCH_OUT``.
"""

import random
import time

import cocotb
from cocotb.triggers import ClockCycles

from cosim.workloads import bench_out
from host_driver.system.hypervisor import Hypervisor
from cosim.harness import CardHarness, CLOCK_NS
from cosim.scenarios.virtio import frame, receive_n
from cosim.uplink import Uplink

N = {64: 64, 1500: 32}
#: host read latencies (ns) and transmit layouts (descriptors per frame) each mode runs with
LATENCIES = {"direct": (0, 1000), "trap": (0,)}
LAYOUTS = {"direct": (2, 1), "trap": (2,)}


@cocotb.test()
async def test_virtio_throughput(dut):
    h = CardHarness(dut)
    await h.start()
    await h.drv.probe()
    vfs = await h.drv.enable_sriov(4)
    rnd = random.Random(9)
    rows = []
    hv = Hypervisor(h.drv, exit_ns=1_000)
    pairs = {"direct": (vfs[0], vfs[1]), "trap": (vfs[2], vfs[3])}
    for mode, (va, vb) in pairs.items():
        ga = await hv.create_guest(f"{mode}-a", [va], mode)
        gb = await hv.create_guest(f"{mode}-b", [vb], mode)
        a, b = ga.nics[0], gb.nics[0]
        await b.post_rx(32)
        for descs, lat, (size, n) in ((d, lat, sn) for d in LAYOUTS[mode]
                                      for lat in LATENCIES[mode] for sn in N.items()):
            h.bridge.read_latency_ns = lat
            frames = [frame(b.mac, a.mac, size, rnd) for _ in range(n)]
            traps0 = ga.traps + gb.traps
            wall0, t0 = time.perf_counter(), h.t.now_ns()
            got = []
            for k, f in enumerate(frames):
                await a.send(f, pushed=descs == 1)
                if k % 16 == 15:
                    got += await receive_n(b, k + 1 - len(got))
            got += await receive_n(b, n - len(got))
            rows.append(_row(mode, lat, size, n, wall0, t0, h, ga.traps + gb.traps - traps0,
                             descs))
            assert got == frames
            dut._log.info("virtio bench: %s", rows[-1])
    # the uplink, both ways, with the direct pair
    up = Uplink(dut, h.data_width)
    far = bytes.fromhex("021122334455")
    ga, gb = hv.guests["direct-a"], hv.guests["direct-b"]
    a, b = ga.nics[0], gb.nics[0]
    for lat, (size, n) in ((lat, sn) for lat in LATENCIES["direct"] for sn in N.items()):
        h.bridge.read_latency_ns = lat
        out = [frame(far, a.mac, size, rnd) for _ in range(n)]
        up.received.clear()
        wall0, t0 = time.perf_counter(), h.t.now_ns()
        for f in out:
            await a.send(f)
        while len(up.received) < n:
            await ClockCycles(dut.clk, 50)
        rows.append(_row("vf_to_uplink", lat, size, n, wall0, t0, h))
        assert up.received == out
        into = [frame(b.mac, far, size, rnd) for _ in range(n)]
        wall0, t0 = time.perf_counter(), h.t.now_ns()
        for f in into:
            up.send(f)
        got = await receive_n(b, n)
        rows.append(_row("uplink_to_vf", lat, size, n, wall0, t0, h))
        assert got == into
        dut._log.info("virtio bench: %s / %s", rows[-2], rows[-1])
    h.bridge.read_latency_ns = 0
    bench_out(rows)


def _row(mode, lat, size, n, wall0, t0, h, traps=0, descs=2):
    """One row: ``n`` frames of ``size`` bytes (sent as ``descs`` descriptors each) from
    simulated ``t0`` / wall ``wall0`` to now."""
    t1, wall1 = h.t.now_ns(), time.perf_counter()
    clocks = (t1 - t0) / CLOCK_NS
    return {"mode": mode, "host_read_ns": lat, "frame_bytes": size, "frames": n,
            "frames_per_wall_s": round(n / (wall1 - wall0), 1),
            "payload_bytes_per_clk": round(n * size / clocks, 3),
            "clocks_per_frame": round(clocks / n, 1), "sim_us": round((t1 - t0) / 1000, 1),
            "traps": traps, "tx_descs": descs, "data_width": h.data_width}
