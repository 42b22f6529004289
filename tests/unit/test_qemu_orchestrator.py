"""host_driver.system.qemu: the seed-004 orchestrator driving QEMU's own migration, against a
fake QEMU / card control that models where the guest runs (the source QEMU, the waiting
QEMU, the rings of each VF) and refuses calls out of order. The co-simulation runs the same
orchestrator on real QEMUs and cards (cosim/benches/linux_twin.py); here every abort point is
reached."""

import asyncio

import pytest

from host_driver.system.migration import (MigrationCosts, MigrationState as S, Network, Outcome,
                                          Server, SlotState, VirtualClock)
from host_driver.system.qemu import QemuMigrationOrchestrator, QemuVm

T1, T2 = 0.8, 0.5
MAC = bytes.fromhex("020ffc000001")
ALL = [s for s in S if s is not S.DONE]


class FakeQemu:
    """Where the guest's CPU runs (``("A", 1)``: the QEMU of A's VF1) and which VF runs its
    rings; ``outcome`` is what QEMU's migration ends with (``completed`` / ``failed``)."""

    def __init__(self, outcome="completed"):
        self.outcome = outcome
        self.running = ("A", 1)              # the guest's QEMU that runs it
        self.rings = ("A", 1)                # the VF serving its rings
        self.waiting = None                  # the -incoming QEMU
        self.migrating = False
        self.paused_source = None            # a source QEMU after completion
        self.macs = {("A", 1): MAC}          # the cards' switch entries
        self.calls = []

    async def start_incoming(self, vm, target, vf):
        assert self.waiting is None and not self.migrating
        self.calls.append("start_incoming")
        self.waiting = (target.name, vf)
        self.migrating = True
        await asyncio.sleep(0)

    async def wait(self, vm):
        assert self.migrating
        self.calls.append("wait")
        self.migrating = False
        await asyncio.sleep(0)
        if self.outcome != "completed":
            return {"status": self.outcome, "error-desc": "the destination went away"}
        self.paused_source, self.running = self.running, self.waiting
        self.rings, self.waiting = self.waiting, None
        return {"status": "completed", "downtime": 12}

    async def switch_over(self, vm, source, svf, target, tvf):
        assert self.running == (target.name, tvf) and self.paused_source == (source.name, svf)
        self.calls.append("switch_over")
        self.macs.pop((source.name, svf))
        self.macs[(target.name, tvf)] = vm.mac

    async def cancel(self, vm, target, vf):
        self.calls.append("cancel")
        self.migrating = False
        self.waiting = None
        assert self.running == self.rings == (vm.host.name, vm.vf)

    async def revert(self, vm, source, svf, target, tvf):
        self.calls.append("revert")
        assert self.paused_source == (source.name, svf)
        self.running = self.rings = self.paused_source
        self.paused_source = None
        self.macs.pop((target.name, tvf), None)
        self.macs[(source.name, svf)] = vm.mac

    async def retire_source(self, vm, source, svf):
        self.calls.append("retire_source")
        assert self.paused_source == (source.name, svf)
        self.paused_source = None


class World:
    def __init__(self, outcome="completed", injector=None, b_vfs=2):
        self.clock = VirtualClock()
        self.net = Network()
        self.a = Server("A", 2, 0.8)
        self.b = Server("B", b_vfs, 0.1)
        self.vm = QemuVm("guest", 0.1, self.clock, MAC)
        self.a.place(self.vm, self.net)
        assert self.vm.vf == 1
        self.qemu = FakeQemu(outcome)
        self.orch = QemuMigrationOrchestrator(
            [self.a, self.b], self.net, T1, T2, clock=self.clock, control=self.qemu,
            failure_injector=injector, costs=MigrationCosts(step_us=1))

    def migrate(self):
        return asyncio.run(self.orch.migrate())

    def on_source(self):
        vm, a, b = self.vm, self.a, self.b
        assert vm.host is a and vm.vf == 1 and a.vms == {"guest": vm} and not b.vms
        assert a.slot(1).state is SlotState.ASSIGNED and a.slot(1).holder == "guest"
        assert all(s.state is SlotState.FREE for s in b.slots.values()) and not b.dummies
        assert self.qemu.running == self.qemu.rings == ("A", 1)
        assert self.qemu.macs == {("A", 1): MAC} and self.net.route["guest"] is a
        assert not a.forward and not b.forward and a.vf_running(1)


def test_migration_moves_the_guest_to_the_reserved_vf():
    w = World()
    res = w.migrate()
    assert res.outcome is Outcome.DONE, res
    assert res.states == [*ALL, S.DONE]
    assert w.qemu.calls == ["start_incoming", "wait", "switch_over", "retire_source"]
    vm, a, b = w.vm, w.a, w.b
    assert vm.host is b and vm.vf == 1 and b.vms == {"guest": vm} and not a.vms
    assert b.slot(1).state is SlotState.ASSIGNED and b.slot(1).holder == "guest"
    assert a.slot(1).state is SlotState.FREE and not b.dummies
    assert w.qemu.running == w.qemu.rings == ("B", 1) and w.qemu.paused_source is None
    assert w.qemu.macs == {("B", 1): MAC} and w.net.route["guest"] is b
    assert not a.forward and b.vf_running(1) and not a.vf_running(1)
    assert res.paused_us == 12_000 and vm.status["status"] == "completed"


def test_qemu_failing_leaves_the_guest_on_the_source():
    w = World(outcome="failed")
    res = w.migrate()
    assert res.outcome is Outcome.ABORTED and "failed" in res.reason, res
    assert S.MOVE_VF_STATE not in res.states
    assert w.qemu.calls == ["start_incoming", "wait", "cancel"]
    w.on_source()


def test_no_free_vf_on_the_target_is_refused():
    def take(state):
        if state is S.SELECT_TARGET:
            w.b.assign_vf("intruder", 1)
            w.b.assign_vf("intruder2", 2)
    w = World(injector=take)
    res = w.migrate()
    assert res.outcome is Outcome.REFUSED, res
    assert w.qemu.calls == []
    w.b.release(1, "intruder")
    w.b.release(2, "intruder2")
    w.on_source()


@pytest.mark.parametrize("fail_at", ALL)
def test_abort_after_each_state_keeps_the_guest_on_the_source(fail_at):
    def inject(state):
        if state is fail_at:
            raise RuntimeError(f"injected after {state.name}")
    w = World(injector=inject)
    res = w.migrate()
    if fail_at is S.FREE_SOURCE:
        # its QEMU has quit: nothing to go back to, it stays complete on the target
        assert res.outcome is Outcome.ROLLED_FORWARD, res
        assert w.vm.host is w.b and w.qemu.running == ("B", 1)
        return
    assert res.outcome is Outcome.ABORTED, res
    w.on_source()
    done = fail_at in (S.MOVE_VF_STATE, S.FORWARD, S.COMMISSION, S.RETIRE_DUMMY)
    assert ("revert" in w.qemu.calls) is done
    assert ("cancel" in w.qemu.calls) is (fail_at is S.MOVE_MEMORY)


def test_a_vm_without_a_vf_is_not_a_qemu_vdpa_guest():
    clock, net = VirtualClock(), Network()
    a, b = Server("A", 1, 0.8), Server("B", 1, 0.1)
    vm = QemuVm("guest", 0.1, clock, MAC)
    a.place(vm, net, sriov=False)
    orch = QemuMigrationOrchestrator([a, b], net, T1, T2, clock=clock, control=FakeQemu())
    res = asyncio.run(orch.migrate())
    assert res.outcome is Outcome.ABORTED and "no VF" in res.reason, res
    assert vm.host is a and b.slot(1).state is SlotState.FREE
