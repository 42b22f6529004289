"""``make demo``'s Linux phases on the two-card top: a Debian guest (QEMU) on card A's VF1 and
another on card B's VF2, their virtio_net rings served by the RTL through our vhost-user
back-end; they ping each other and the peer outside both servers. Then the orchestrator
(:class:`host_driver.system.qemu.QemuMigrationOrchestrator`) migrates A's guest to card B with
QEMU while it pings the peer every 100 ms; each echo request is sampled where it entered the
network (card A or card B) for the timeline. Events go to ``OFFCARD_DEMO_EVENTS`` as in
:mod:`cosim.workloads.demo` (``phase`` events, ``ping`` samples, ``result`` events of sections
``linux`` and ``linux_migration``)."""

import json
import os
import time

import cocotb

from host_driver.system.live import CardServer, TransportClock
from host_driver.system.migration import MigrationCosts, Network, Outcome
from host_driver.system.qemu import QemuMigrationOrchestrator, QemuVm
from cosim.scenarios.dirty import WireWrites
from cosim.scenarios.guest_rig import TwinRig, PEER_IP, PEER_MAC, vf_ip, vf_mac
from cosim.scenarios.linux import sim_rtts_us, ping_start, ping_summary, ping_wait
from cosim.scenarios.qemu_migration import TwinQemuControl, retired, set_mac
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
    guest_mac = bytes.fromhex(vf_mac(1).replace(":", ""))
    try:
        await set_mac(b.h, 1, retired(guest_mac))         # B's VF1: free, no address yet
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
        clock = TransportClock(a.h.t)
        srv_a = CardServer("A", a.h.drv, [a.vfs[0]], load=0.8)
        srv_b = CardServer("B", b.h.drv, b.vfs[:2], load=0.1)
        network = Network()
        vm = QemuVm("guest", 0.1, clock, guest_mac)
        srv_a.place(vm, network)
        srv_b.assign_vf("guest2", 2)
        control = TwinQemuControl(dut._log, rig, {"A": WireWrites(a.h), "B": WireWrites(b.h)})
        pings = 40 if short else 100
        rc, out = await a.run(1, ping_start(PEER_IP, pings, 0.1))
        assert rc == 0, out
        res = await QemuMigrationOrchestrator(
            [srv_a, srv_b], network, t1=0.7, t2=0.5, clock=clock, control=control,
            costs=MigrationCosts(step_us=1)).migrate()
        assert res.outcome is Outcome.DONE, res
        rc, out = await b.run(1, ping_wait(pings * 0.1 + 30), timeout_s=pings * 0.1 + 90)
        sent, got, _ = ping_summary(out)
        assert sent == pings, out
        for t, card in echo_requests(rig.fabric, guest_mac):
            emit("ping", t_ns=t, card=card)
        st = control.finished[-1]
        emit("phase", name="linux_migration", state="done")
        emit("result", section="linux_migration", outcome=res.outcome.value,
             route=f"{res.source} VF1 -> {res.target} VF{vm.vf}",
             qemu_total_ms=st.get("total-time"), qemu_downtime_ms=st.get("downtime"),
             card_pause_us=st["card_pause_us"], pages_written=st["pages_written"],
             pages_logged=st["pages_logged"], pings_sent=sent, pings_lost=sent - got,
             rarps_from_b=len(b.card.announcements), wall_s=round(time.monotonic() - t1, 1))
    finally:
        rig.close()


def rig_kernel():
    from cosim.guest.image import ensure_image
    return ensure_image().kernel_version
