"""host_driver.system.migration: the live-migration orchestrator between two servers with fake cards,
under continuous traffic in both directions (network -> guest and guest -> network)."""

import asyncio
import random
import threading
import pytest
from concurrent.futures import ThreadPoolExecutor
from fakes import CardError, FakeVfCard
from host_driver.system.migration import (Datapath, MigrationCosts, MigrationOrchestrator,
                                          MigrationResult, MigrationState as S, Network, NoFreeVf,
                                          Outcome, Server, SlotState, VfBusy, VirtualClock, Vm)
from hypothesis import given, settings, strategies as st

ALL = [s for s in S if s is not S.DONE]
T1, T2 = 0.8, 0.5


class Injected(Exception):
    pass


def fake_card(vfs, seed, yields=1):
    """A card with VFs 1..``vfs``, stopped until placed (:class:`fakes.FakeVfCard`): bytes 0..7
    of a VF's state are its generation, bumped by each resume, the rest (``[8:]``) is the payload
    that must move unchanged."""
    return FakeVfCard(range(1, vfs + 1), seed=seed, yields=yields)


class World:
    """Server A (busy, VM ``g`` on a VF of it) and server B (idle), plus extra servers."""

    def __init__(self, a_vfs=2, b_vfs=2, a_load=0.5, b_load=0.1, yields=1, injector=None,
                 sriov=True, extra=()):
        self.clock = VirtualClock()
        self.net = Network()
        self.a = Server("A", a_vfs, a_load, fake_card(a_vfs, 1, yields))
        self.b = Server("B", b_vfs, b_load, fake_card(b_vfs, 2, yields))
        self.servers = [self.a, self.b, *extra]
        self.vm = Vm("g", 0.4, self.clock, memory_mb=256)
        self.a.place(self.vm, self.net, sriov=sriov)
        for s in self.servers:          # the placed VFs run on the cards
            for vf in s.running:
                s.card.running[vf] = True
        self.svf = self.vm.vf
        self.payload = bytes(self.a.card.state[self.svf][8:]) if sriov else None
        self.costs = MigrationCosts()
        self.orch = MigrationOrchestrator(self.servers, self.net, T1, T2, clock=self.clock,
                                          failure_injector=injector, costs=self.costs)
        self.vms = [self.vm]
        self.stop = asyncio.Event()

    async def traffic(self, rx=1, tx=1):
        n = 0
        while not self.stop.is_set():
            for vm in self.vms:
                for _ in range(rx):
                    self.net.send_to(vm, n)
                    n += 1
                for _ in range(tx):
                    vm.transmit(n)
                    n += 1
            await asyncio.sleep(0)

    async def run(self, *migrations, warm=5, after=10, rx=1, tx=1):
        """Traffic throughout; the migrations (coroutines) in parallel; marks of each ledger
        when they all ended."""
        task = asyncio.create_task(self.traffic(rx, tx))
        for _ in range(warm):
            await asyncio.sleep(0)
        results = await asyncio.gather(*migrations)
        marks = {vm.name: (len(vm.rx.deliveries), len(vm.tx.deliveries)) for vm in self.vms}
        for _ in range(after):
            await asyncio.sleep(0)
        self.stop.set()
        await task
        return results, marks


def assert_no_loss(vm):
    for led in (vm.rx, vm.tx):
        assert led.lost == [] and led.duplicated == [] and led.dropped == [], (vm, led.dropped)
        assert len(led.sent) > 0


def after(vm, marks):
    mrx, mtx = marks[vm.name]
    return vm.rx.paths(mrx) | vm.tx.paths(mtx)


# ---- the migration ---------------------------------------------------------------------

def test_migration_under_traffic_moves_vm_to_target_vf():
    async def main():
        w = World()
        a, b, vm = w.a, w.b, w.vm
        load_a, load_b = a.load, b.load
        assert load_a > T1 and load_b < T2
        (res,), marks = await w.run(w.orch.migrate())
        assert res.outcome is Outcome.DONE, res.reason
        assert res.states == ALL + [S.DONE]
        assert (res.vm, res.source, res.target) == ("g", "A", "B")
        # the VM runs on B on the replacement VF; no host-path hop afterwards
        tvf = vm.vf
        assert vm.host is b and vm.datapath is Datapath.VF and "g" in b.vms and "g" not in a.vms
        assert b.slot(tvf).state is SlotState.ASSIGNED and b.slot(tvf).holder == "g"
        assert after(vm, marks) == {("vf@B",)}
        assert w.net.route["g"] is b and a.forward == {} and b.dummies == {}
        # the source VF is free, the load moved
        assert a.slot(w.svf).state is SlotState.FREE and a.free_vfs() == [1, 2]
        assert a.load == pytest.approx(load_a - 0.4) and b.load == pytest.approx(load_b + 0.4)
        # nothing lost or duplicated; the source forwarded what still reached it
        assert_no_loss(vm)
        assert res.forwarded > 0
        assert any(d.hops[0] == "fwd@A" for d in vm.rx.deliveries)
        # every path in its phase, in order
        phase = {"vf@A": 0, "synthetic@A": 1, "synthetic@B": 2, "vf@B": 3}
        for led in (vm.rx, vm.tx):
            seen = [phase[d.hops[-1]] for d in led.deliveries]
            assert seen == sorted(seen) and set(seen) == {0, 1, 2, 3}
        # the VF state moved byte for byte, and only after the switch to the synthetic path
        assert a.card.calls == [("quiesce", w.svf), ("export_state", w.svf)]
        assert b.card.calls == [("import_state", tvf), ("resume", tvf)]
        assert b.card.state[tvf][8:] == w.payload and b.card.gen(tvf) == 1
        # blackout: the final copy, measured from the frames
        assert res.paused_us == w.costs.stop_copy_us
        assert res.blackout_us == pytest.approx(res.paused_us)
        assert res.last_source_us < res.first_target_us
    asyncio.run(main())


def test_blackout_is_read_when_asked():
    """The blackout is taken from the frames when it is asked for: before the guest's first
    frame through the target it is unknown (None), afterwards it is known, although
    migrate() returned before that frame came."""
    frames = [(5.0, "A")]                          # (time, server) of the guest's frames
    res = MigrationResult(Outcome.DONE)
    res.trace = lambda: (max((t for t, s in frames if s == "A"), default=None),
                         min((t for t, s in frames if s == "B"), default=None))
    assert (res.last_source_us, res.first_target_us, res.blackout_us) == (5.0, None, None)
    frames += [(12.5, "B"), (14.0, "B")]
    assert (res.first_target_us, res.blackout_us) == (12.5, 7.5)
    assert MigrationResult(Outcome.NO_TARGET).blackout_us is None


def test_vm_without_direct_assignment_moves_without_vf_steps():
    async def main():
        w = World(sriov=False)
        (res,), marks = await w.run(w.orch.migrate())
        assert res.outcome is Outcome.DONE
        assert w.vm.host is w.b and w.vm.vf is None and after(w.vm, marks) == {("synthetic@B",)}
        assert w.a.card.calls == w.b.card.calls == [] and w.b.free_vfs() == [1, 2]
        assert_no_loss(w.vm)
    asyncio.run(main())


# ---- nothing to do, nowhere to go ---------------------------------------------------------

@pytest.mark.parametrize("why", ["target above T2", "target has no free VF", "no other server"])
def test_no_qualifying_target_moves_nothing(why):
    async def main():
        if why == "target above T2":
            w = World(b_load=0.5)
        elif why == "target has no free VF":
            w = World(b_vfs=1)
            other = Vm("h", 0.0, w.clock)
            w.b.place(other, w.net)
        else:
            w = World()
            w.orch.servers = [w.a]
        slots = {s.name: [(v.state, v.holder) for v in s.slots.values()] for s in w.servers}
        (res,), marks = await w.run(w.orch.migrate())
        assert res.outcome is Outcome.NO_TARGET and res.states == [S.SELECT_VM]
        assert "no server below T2" in res.reason and res.target is None
        assert w.vm.host is w.a and w.vm.vf == w.svf and after(w.vm, marks) == {("vf@A",)}
        assert {s.name: [(v.state, v.holder) for v in s.slots.values()]
                for s in w.servers} == slots
        assert w.a.card.calls == w.b.card.calls == [] and not w.vm.migrating
        assert_no_loss(w.vm)
    asyncio.run(main())


def test_source_not_above_t1_is_left_alone():
    async def main():
        w = World(a_load=0.3)
        (res,), _ = await w.run(w.orch.migrate())
        assert res.outcome is Outcome.NOT_NEEDED and res.states == []
        assert "not above T1" in res.reason
        assert w.vm.host is w.a
    asyncio.run(main())


# ---- the race for the last VF -------------------------------------------------------------

def test_two_migrations_race_for_the_last_free_vf():
    async def main():
        w = World(b_vfs=1)
        c = Server("C", 1, 0.5, fake_card(1, 3))
        w.servers.append(c)
        w.orch.servers.append(c)
        h = Vm("h", 0.4, w.clock)
        c.place(h, w.net)
        c.card.running[h.vf] = True
        w.vms.append(h)
        (r1, r2), marks = await w.run(w.orch.migrate(w.a), w.orch.migrate(c))
        # both chose B: the race was real
        assert r1.target == r2.target == "B"
        assert {r1.outcome, r2.outcome} == {Outcome.DONE, Outcome.REFUSED}
        win, lose = (r1, r2) if r1.outcome is Outcome.DONE else (r2, r1)
        assert lose.states == [S.SELECT_VM, S.SELECT_TARGET, S.DETECT_SRIOV]
        assert "no free VF" in lose.reason
        winner = w.vm if win.vm == "g" else h
        loser = h if winner is w.vm else w.vm
        assert w.b.slot(1).holder == winner.name and w.b.slot(1).state is SlotState.ASSIGNED
        assert loser.host.name == lose.source and after(loser, marks) == {(f"vf@{lose.source}",)}
        assert not loser.migrating and w.b.dummies == {}
        for vm in (w.vm, h):
            assert_no_loss(vm)
    asyncio.run(main())


def test_one_vm_is_never_migrated_twice_at_once():
    async def main():
        w = World()
        (r1, r2), _ = await w.run(w.orch.migrate(vm=w.vm), w.orch.migrate(vm=w.vm))
        assert sorted(r.outcome.value for r in (r1, r2)) == ["done", "not_needed"]
        assert w.vm.host is w.b and not w.vm.migrating
        assert_no_loss(w.vm)
    asyncio.run(main())


# ---- the reserved VF is never double-assigned ----------------------------------------------

def test_reserved_vf_cannot_be_taken_by_anyone_else():
    s = Server("X", 1)
    vf = s.reserve_vf("dummy:g")
    with pytest.raises(NoFreeVf):
        s.reserve_vf("dummy:h")
    with pytest.raises(NoFreeVf):
        s.assign_vf("h")
    with pytest.raises(VfBusy):
        s.assign_vf("h", vf)
    with pytest.raises(VfBusy):
        s.transfer(vf, "dummy:h", "h")          # only the holder hands it on
    with pytest.raises(VfBusy):
        s.release(vf, "h")
    s.transfer(vf, "dummy:g", "g")
    with pytest.raises(VfBusy):
        s.transfer(vf, "dummy:g", "g")          # a reservation is handed on once
    assert (s.slot(vf).state, s.slot(vf).holder) == (SlotState.ASSIGNED, "g")
    s.release(vf, "g")
    assert s.free_vfs() == [vf]


def test_concurrent_reservations_get_distinct_vfs():
    async def main():
        s = Server("X", 4)
        rnd = random.Random(5)

        async def grab(k):
            for _ in range(rnd.randrange(4)):
                await asyncio.sleep(0)
            try:
                return s.reserve_vf(f"d{k}")
            except NoFreeVf:
                return None
        got = [g for g in await asyncio.gather(*(grab(k) for k in range(40))) if g is not None]
        assert sorted(got) == [1, 2, 3, 4]
    asyncio.run(main())

    s = Server("Y", 4)
    barrier = threading.Barrier(16)

    def grab_thread(k):
        barrier.wait()
        try:
            return s.reserve_vf(f"t{k}")
        except NoFreeVf:
            return None
    with ThreadPoolExecutor(16) as ex:
        got = [g for g in ex.map(grab_thread, range(16)) if g is not None]
    assert sorted(got) == [1, 2, 3, 4]
    assert len({v.holder for v in s.slots.values()}) == 4


@settings(max_examples=80, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["reserve", "assign", "transfer", "release"]),
                              st.integers(0, 3), st.integers(1, 3), st.integers(0, 3)),
                    max_size=40))
def test_slot_holders_follow_only_legal_moves(ops):
    """Against a model: a VF changes hands only FREE -> held, a reservation -> its holder's
    assignee, held -> FREE by the holder; every refused operation changes nothing."""
    s = Server("X", 3)
    model = {i: (SlotState.FREE, None) for i in (1, 2, 3)}
    for op, who, vf, to in ops:
        owner = f"o{who}"
        before = dict(model)
        try:
            if op == "reserve":
                got = s.reserve_vf(owner)
                assert model[got][0] is SlotState.FREE
                model[got] = (SlotState.RESERVED, owner)
            elif op == "assign":
                s.assign_vf(owner, vf)
                assert model[vf][0] is SlotState.FREE
                model[vf] = (SlotState.ASSIGNED, owner)
            elif op == "transfer":
                s.transfer(vf, owner, f"o{to}")
                assert model[vf] == (SlotState.RESERVED, owner)
                model[vf] = (SlotState.ASSIGNED, f"o{to}")
            else:
                s.release(vf, owner)
                assert model[vf][1] == owner
                model[vf] = (SlotState.FREE, None)
        except (NoFreeVf, VfBusy):
            if op == "reserve":
                assert all(st_ is not SlotState.FREE for st_, _ in before.values())
            elif op == "assign":
                assert before[vf][0] is not SlotState.FREE
            elif op == "transfer":
                assert before[vf] != (SlotState.RESERVED, owner)
            else:
                assert before[vf][1] != owner or before[vf][0] is SlotState.FREE
        assert {i: (v.state, v.holder) for i, v in s.slots.items()} == model


# ---- abort at every state ------------------------------------------------------------------

def check_back_on_source(w, res, marks, svf=None):
    vm, a, b = w.vm, w.a, w.b
    svf = w.svf if svf is None else svf
    assert res.outcome is Outcome.ABORTED and isinstance(res.error, (Injected, CardError))
    assert vm.host is a and vm.vf == svf and vm.datapath is Datapath.VF and not vm.migrating
    assert a.slot(svf).state is SlotState.ASSIGNED and a.slot(svf).holder == "g"
    assert a.vf_running(svf) and a.card.running[svf]
    assert after(vm, marks) == {("vf@A",)}
    assert w.net.route["g"] is a and a.forward == {} and b.forward == {}
    # the target's reservation is released, nothing of it runs
    assert b.free_vfs() == [1, 2] and b.dummies == {} and not any(b.card.running.values())
    assert b.running == set() and "g" not in b.vms and vm.config_vf is None
    # the device state carried on through every VF that ran it, nothing of it lost
    assert a.card.state[svf][8:] == w.payload
    assert a.card.gen(svf) == a.card.resumes() + b.card.resumes()
    assert_no_loss(vm)


@pytest.mark.parametrize("fail_at", ALL, ids=[s.name for s in ALL])
def test_abort_after_each_state_keeps_guest_on_source(fail_at):
    def injector(state):
        if state is fail_at:
            raise Injected(state.name)

    async def main():
        w = World(injector=injector)
        (res,), marks = await w.run(w.orch.migrate())
        assert res.states == ALL[:ALL.index(fail_at) + 1]
        assert res.reason.startswith(f"Injected after {fail_at.name}")
        check_back_on_source(w, res, marks)
        if ALL.index(fail_at) >= ALL.index(S.COMMISSION):       # the target VF had run
            assert ("export_state", 1) in w.b.card.calls
            assert w.a.card.calls[-2:] == [("import_state", w.svf), ("resume", w.svf)]
    asyncio.run(main())


@pytest.mark.parametrize("card,op", [("a", "quiesce"), ("a", "export_state"),
                                     ("b", "import_state"), ("b", "resume")])
def test_card_failure_inside_a_step_rolls_back(card, op):
    async def main():
        w = World()
        getattr(w, card).card.fail = op
        (res,), marks = await w.run(w.orch.migrate())
        assert isinstance(res.error, CardError) and " in " in res.reason
        check_back_on_source(w, res, marks)
    asyncio.run(main())


@pytest.mark.parametrize("a_vfs", [1, 2])
def test_failure_after_free_source_when_the_freed_vf_was_taken(a_vfs):
    """The injector takes the freed source VF before failing: with another VF free on the
    source the VM goes back onto that one (its state imported); with none it stays, complete,
    on the target. Either way the guest runs and loses nothing."""
    w_box = []

    def injector(state):
        if state is S.FREE_SOURCE:
            w = w_box[0]
            w.a.assign_vf("intruder", w.svf)
            raise Injected("after the free")

    async def main():
        w = World(a_vfs=a_vfs, injector=injector)
        w_box.append(w)
        (res,), marks = await w.run(w.orch.migrate())
        if a_vfs == 2:
            other = 2 if w.svf == 1 else 1
            check_back_on_source(w, res, marks, svf=other)
        else:
            assert res.outcome is Outcome.ROLLED_FORWARD and res.states == ALL
            assert w.vm.host is w.b and after(w.vm, marks) == {("vf@B",)}
            assert w.b.slot(w.vm.vf).holder == "g" and not w.vm.migrating
            assert_no_loss(w.vm)
        assert w.a.slot(w.svf).holder == "intruder"
    asyncio.run(main())


def test_failure_during_the_final_copy_resumes_the_guest_on_the_source():
    """The VM is paused for the final copy when the copy fails: it resumes where it was and
    gets the frames held for it meanwhile."""
    class FailingCopy(VirtualClock):
        async def sleep_us(self, us):
            await super().sleep_us(us)
            if us == MigrationCosts().stop_copy_us:
                raise CardError("final copy failed")

    async def main():
        w = World()
        w.clock = FailingCopy()
        for vm in w.vms:
            vm.rx.now_us = vm.tx.now_us = w.clock.now_us
        w.orch.clock = w.clock
        (res,), marks = await w.run(w.orch.migrate())
        assert res.reason.startswith("CardError in FORWARD")
        assert not w.vm.paused
        check_back_on_source(w, res, marks)
    asyncio.run(main())


# ---- random interleavings ------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(fail_at=st.sampled_from([None] + ALL), yields_a=st.integers(0, 3),
       yields_b=st.integers(0, 3), warm=st.integers(0, 8), rx=st.integers(0, 3),
       tx=st.integers(0, 3), after_n=st.integers(1, 6))
def test_random_interleavings_lose_nothing(fail_at, yields_a, yields_b, warm, rx, tx, after_n):
    def injector(state):
        if state is fail_at:
            raise Injected(state.name)

    async def main():
        w = World(injector=injector)
        w.a.card.yields, w.b.card.yields = yields_a, yields_b
        (res,), marks = await w.run(w.orch.migrate(), warm=warm, after=after_n, rx=rx, tx=tx)
        vm = w.vm
        for led in (vm.rx, vm.tx):
            assert led.lost == [] and led.duplicated == [] and led.dropped == []
        assert w.a.dropped == [] and w.b.dropped == []
        home = w.b if fail_at is None else w.a
        assert res.outcome is (Outcome.DONE if fail_at is None else Outcome.ABORTED)
        assert vm.host is home and vm.datapath is Datapath.VF
        assert after(vm, marks) <= {(f"vf@{home.name}",)}
        held = [(s.name, v.index) for s in (w.a, w.b) for v in s.slots.values()
                if v.state is not SlotState.FREE]
        assert held == [(home.name, vm.vf)]
        card = home.card
        assert card.state[vm.vf][8:] == w.payload
        assert card.gen(vm.vf) == w.a.card.resumes() + w.b.card.resumes()
    asyncio.run(main())
