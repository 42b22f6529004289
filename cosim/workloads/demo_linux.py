"""``make demo``'s Linux phases on the two-card top: a Debian guest (QEMU) on card A's VF1 and
another on card B's VF2, their virtio_net rings served by the RTL through our vhost-user
back-end; they ping each other and the peer outside both servers. Then the orchestrator
(:class:`host_driver.system.qemu.QemuMigrationOrchestrator`, with each host's switch on its PF)
migrates A's guest to card B with QEMU while it pings the peer every 100 ms; each echo request is sampled where it entered the
network (card A or card B) for the timeline. Events go to ``OFFCARD_DEMO_EVENTS`` as in
:mod:`cosim.workloads.demo` (``phase`` events, ``ping`` samples, ``result`` events of sections
``linux`` and ``linux_migration``)."""

import json
import os
import time

import cocotb

from cosim.scenarios.guest_rig import TwinRig, PEER_IP, PEER_MAC, mac_bytes, vf_ip, vf_mac
from cosim.scenarios.linux import sim_rtts_us, ping_summary
from cosim.scenarios.qemu_migration import orchestrated_migration
from cosim.scenarios.virtio import counters

ICMP_ECHO_REQUEST = 8


def emit(kind, **fields):
    path = os.environ.get("OFFCARD_DEMO_EVENTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"kind": kind, "t_us": round(cocotb.utils.get_sim_time("ns")
                                                            / 1000, 3), **fields}) + "\n")


def echo_requests(fabric, mac):
    """(simulated ns, ingress card) of every ICMP echo request from ``mac`` to the peer."""
    return [(t, ingress) for t, ingress, _, f in fabric.log
            if f[6:12] == mac and f[:6] == PEER_MAC and f[12:14] == b"\x08\x00"
            and len(f) > 34 and f[23] == 1 and f[34] == ICMP_ECHO_REQUEST]


@cocotb.test()
async def test_demo_linux(dut):
    short = os.environ.get("OFFCARD_DEMO_SHORT") == "1"
    count = 3 if short else 10
    emit("phase", name="linux", state="start")
    t0 = time.monotonic()
    rig = await TwinRig(dut, [1], [1, 2]).start()
    a, b = rig.a, rig.b
    guest_mac = mac_bytes(vf_mac(1))
    try:
        g1 = await a.boot(1, qmp=True)
        g2 = await b.boot(2)
        outputs, res = {}, {}
        be1 = a.card.backends[1]
        for r, src, dst, name in ((a, 1, PEER_IP, "vf1_to_peer"), (b, 2, PEER_IP, "vf2_to_peer"),
                                  (a, 1, vf_ip(2), "vf1_to_vf2"), (b, 2, vf_ip(1), "vf2_to_vf1")):
            mark = len(be1.trace)
            rc, out = await r.run(src, f"ping -c {count} -i 0.2 -W 5 {dst}", timeout_s=120)
            if name == "vf1_to_peer":
                trace = be1.trace[mark:]
            assert rc == 0, out
            tx, rx, avg = ping_summary(out)
            assert tx == rx == count, out
            outputs[name] = f"{r.name}:VF{src}$ ping -c {count} {dst}\n{out.strip()}"
            res[f"{name}_replies"] = f"{rx}/{tx}"
            res[f"{name}_rtt_wall_ms"] = avg
        rtt = sim_rtts_us(trace)
        ctr = await counters(a.h)
        emit("phase", name="linux", state="done")
        emit("result", section="linux", guests=2, kernel=rig_kernel(),
             boot_vf1_s=round(g1.boot_s, 1), boot_vf2_s=round(g2.boot_s, 1),
             sim_rtt_vf1_us_median=round(sorted(rtt)[len(rtt) // 2], 2) if rtt else None,
             card_tx_frames=ctr["TX_FRAMES"], card_rx_frames=ctr["RX_FRAMES"],
             wall_s=round(time.monotonic() - t0, 1), **res, ping_output=outputs)

        # ---- QEMU migrates A's guest to card B while it pings the peer every 100 ms ----
        emit("phase", name="linux_migration", state="start")
        t1 = time.monotonic()
        res, row = await orchestrated_migration(dut._log, rig, 40 if short else 100)
        for t, card in echo_requests(rig.fabric, guest_mac):
            emit("ping", t_ns=t, card=card)
        emit("phase", name="linux_migration", state="done")
        emit("result", section="linux_migration", outcome=res.outcome.value, **row,
             wall_s=round(time.monotonic() - t1, 1))
    finally:
        rig.close()


def rig_kernel():
    from cosim.guest.image import ensure_image
    return ensure_image().kernel_version
