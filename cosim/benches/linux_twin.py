"""A Linux guest migrated by QEMU from one server's card to another's (issue 19, seed 004), on
the two-card top (``cosim.twin``): card A and card B, each on its own ``RootComplex`` and host
memory, serving VFs over vhost-user (:class:`cosim.scenarios.guest_rig.TwinRig`), their uplinks
joined by a learning switch with the peer outside both servers. The migration is the
orchestrator's (:class:`host_driver.system.qemu.QemuMigrationOrchestrator`: loads against T1
and T2, the dummy VM reserving B's VF, QEMU driven over QMP, commissioning, the source freed),
acting on real QEMUs and real cards (:class:`cosim.scenarios.qemu_migration.TwinQemuControl`)."""

import cocotb

from cosim.scenarios.dirty import WireWrites
from cosim.scenarios.guest_rig import TwinRig, PEER_IP, PEER_MAC, mac_bytes, vf_ip, vf_mac
from cosim.scenarios.linux import ping_start, ping_summary, ping_wait, TrafficAcross
from host_driver.system.live import CardServer, TransportClock
from host_driver.system.migration import MigrationCosts, MigrationState, Network, Outcome, SlotState
from host_driver.system.qemu import QemuMigrationOrchestrator, QemuVm
from cosim.scenarios.qemu_migration import TwinQemuControl
from cosim.scenarios.virtio import counters
from cosim.vhost_card import ETH_RARP


def frames_from(fabric, mac, since_ns):
    """Ports of the fabric where frames from ``mac`` came in since ``since_ns``."""
    return [ingress for t, ingress, _, f in fabric.log if t >= since_ns and f[6:12] == mac]


@cocotb.test()
async def test_qemu_migration_between_cards(dut):
    """Server A (load 0.9, above T1) runs a Linux guest on its card's VF1; server B (0.2, below
    T2) a second guest on its VF2 and a free VF1. The orchestrator moves A's guest to B:

    * the target's reservation failing (B's free VF taken as the orchestrator picks B): refused,
      the guest runs on on A, B's VF goes back free;
    * the destination QEMU killed in mid-migration: aborted, QEMU's migration failed, the guest
      runs on on A's VF (pings answered), B's VF released, the dummy gone;
    * under traffic (a ping every 100 ms, 256 KiB over TCP to B's guest): done; card A logs the
      pages it writes into QEMU's dirty log (every page on A's wire while logged is marked);
      frames that reach A after the switch-over go to A's host switch (its PF) and on to B's,
      which hands them to the guest's new VF;
      QEMU's announcement makes card B broadcast a RARP from the guest's MAC; the transfer
      arrives byte-exact; the guest's frames enter the network only at B afterwards (B's
      transmit counter grows, card A sends only its host switch's forwarding); A's VF1 is
      free, the dummy gone;
    * and back to A (the loads swapped) the same way."""
    rig = await TwinRig(dut, [1], [1, 2]).start()
    a, b, fabric = rig.a, rig.b, rig.fabric
    guest_mac = mac_bytes(vf_mac(1))
    log = dut._log
    try:
        await a.boot(1, qmp=True)
        await b.boot(2)                                       # the transfer's receiver on B
        clock = TransportClock(a.h.t)
        srv_a = CardServer("A", a.h.drv, [a.vfs[0]], load=0.8)
        srv_b = CardServer("B", b.h.drv, b.vfs[:2], load=0.1)
        servers = {"A": srv_a, "B": srv_b}
        network = Network()
        vm = QemuVm("guest", 0.1, clock, guest_mac)
        srv_a.place(vm, network)
        receiver = QemuVm("receiver", 0.1, clock, mac_bytes(vf_mac(2)))
        srv_b.assign_vf(receiver.name, 2)
        wires = {"A": WireWrites(a.h), "B": WireWrites(b.h)}
        # each host's switch on its PF forwards what reaches it for a guest that has left
        switches = await rig.start_host_switches({"A": srv_a, "B": srv_b}, {guest_mac: vm})

        def orchestrator(control, injector=None):
            return QemuMigrationOrchestrator(
                servers.values(), network, t1=0.8, t2=0.5, clock=clock, control=control,
                failure_injector=injector, costs=MigrationCosts(step_us=1))

        async def pings_ok(r, n, what):
            rc, out = await r.run(n, f"ping -c 3 -W 5 {PEER_IP}", timeout_s=120)
            assert rc == 0 and " 0% packet loss" in out, f"{what}: {out}"

        await pings_ok(a, 1, "the guest on A")
        assert set(frames_from(fabric, guest_mac, 0)) == {"A"}
        rc, out = await a.run(1, f"ping -c 3 -W 5 {vf_ip(2)}", timeout_s=120)
        assert rc == 0 and " 0% packet loss" in out, f"A's guest to B's guest: {out}"

        # 1. the reservation fails: B's free VF goes to someone else as B is chosen
        def take_b_vf(state):
            if state is MigrationState.SELECT_TARGET:
                srv_b.assign_vf("intruder", 1)
        res = await orchestrator(TwinQemuControl(log, rig, wires), take_b_vf).migrate()
        log.info("reservation failing: %s (%s)", res.outcome.value, res.reason)
        assert res.outcome is Outcome.REFUSED, res
        assert vm.host is srv_a and vm.vf == 1 and not srv_b.dummies and 1 not in b.guests
        srv_b.release(1, "intruder")
        await pings_ok(a, 1, "the guest on A after the refused reservation")

        # 2. the destination QEMU dies in mid-migration
        slow = TwinQemuControl(log, rig, wires, then_bandwidth=200_000)

        def kill_destination(state):
            if state is MigrationState.MOVE_MEMORY:
                b.kill(1)
        res = await orchestrator(slow, kill_destination).migrate()
        log.info("destination killed: %s (%s)", res.outcome.value, res.reason)
        assert res.outcome is Outcome.ABORTED and "failed" in res.reason, res
        assert vm.host is srv_a and vm.vf == 1 and srv_a.slot(1).holder == vm.name
        assert srv_b.slot(1).state is SlotState.FREE and not srv_b.dummies
        assert a.card.backends[1].live and 1 not in a.card.dirty.logs
        await pings_ok(a, 1, "the guest on A after the failed migration")

        # 3. under traffic
        traffic = await TrafficAcross(a, 1, b, 2, PEER_IP, count=200).start()
        control = TwinQemuControl(log, rig, wires)
        res = await orchestrator(control).migrate()
        log.info("migration A -> B: %s (%s)", res.outcome.value, res.reason)
        assert res.outcome is Outcome.DONE, res
        st = control.finished[-1]
        t_done = a.h.t.now_ns()
        assert vm.host is srv_b and vm.vf == 1 and srv_b.slot(1).holder == vm.name
        assert srv_a.slot(1).state is SlotState.FREE and not srv_b.dummies
        assert a.card.backends[1].memory is None                # A's VF1 reset, free
        def rarps():
            return [i for t, i, _, f in fabric.log if f[6:12] == guest_mac
                    and int.from_bytes(f[12:14], "big") == ETH_RARP]
        await rig.pump.until(rarps, 60, "QEMU's announcement through card B")
        assert b.card.announcements and set(rarps()) == {"B"}, rarps()
        ctr_b = await counters(b.h)
        await traffic.finish(log, b, 1, "A -> B")
        # from now on the guest's frames go through card B only
        await pings_ok(b, 1, "the guest on B")
        after = frames_from(fabric, guest_mac, t_done)
        assert after and set(after) == {"B"}, after
        ctr_b2 = await counters(b.h)
        assert ctr_b2["TX_FRAMES"] >= ctr_b["TX_FRAMES"] + 5, (ctr_b, ctr_b2)
        # card A puts nothing of the guest's on the network any more: only its host switch's
        # forwarding, from A's PF
        pf_a = switches["A"].mac
        stray = [f[:14].hex() for t, i, _, f in fabric.log
                 if i == "A" and t >= t_done and f[6:12] != pf_a]
        assert not stray, stray
        log.info("QEMU migration A -> B: %s; RARPs from B: %d; frames forwarded by A's host "
                 "switch to B: %d, delivered there: %d",
                 {k: st.get(k) for k in ("total-time", "downtime", "card_pause_us",
                                         "pages_written", "pages_logged")}, len(rarps()),
                 len(switches["A"].forwarded), len(switches["B"].delivered))
        lost = [f[:14].hex() for sw in switches.values() for f in sw.dropped
                if f[:6] == guest_mac]
        assert not lost, f"frames for the guest dropped by a host switch: {lost}"

        # 4. back to A once A is the lighter server
        srv_a.base_load, srv_b.base_load = 0.1, 0.8
        rc, out = await b.run(1, ping_start(PEER_IP, 80, 0.1))
        assert rc == 0, out
        t_back = b.h.t.now_ns()
        res = await orchestrator(TwinQemuControl(log, rig, wires)).migrate()
        log.info("migration B -> A: %s (%s)", res.outcome.value, res.reason)
        assert res.outcome is Outcome.DONE and vm.host is srv_a and vm.vf == 1, res
        assert srv_b.slot(1).state is SlotState.FREE and srv_b.slot(2).holder == "receiver"
        rc, out = await a.run(1, ping_wait(8 + 30), timeout_s=8 + 90)
        sent, got, _ = ping_summary(out)
        log.info("pings across the migration B -> A: %d sent, %d answered", sent, got)
        assert sent == 80 and got >= 60, f"pings across the migration back: {out}"
        await pings_ok(a, 1, "the guest back on A")
        t_end = a.h.t.now_ns()
        # no host switch ever put a frame on the network under someone else's address
        assert fabric.table.where[PEER_MAC] == "peer" and fabric.table.moves == 2, \
            (fabric.table.where, fabric.table.moves)
        back = [i for t, i, _, f in fabric.log if t_back <= t <= t_end and f[6:12] == guest_mac]
        assert back[-1] == "A" and set(back) == {"A", "B"}, back
    finally:
        rig.close()
