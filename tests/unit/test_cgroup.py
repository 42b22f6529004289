"""Unit tests of host_driver.system.cgroup: the cgroup v2 CPU model (cpu.weight, cpu.max) and the
isolation it gives a host management VM from a noisy user VM."""

import math
import random
import pytest
from host_driver.system.cgroup import EPS, CpuCgroup, HostCpu, Task, WorkTask

NCPUS = 2
TICK = 100                 # us
COST = 200                 # us of CPU per management request
INTERVAL = 1_000           # a management request every 1 ms
USER_QUOTA = 150_000       # cpu.max of the user VMs: 1.5 CPUs per 100 ms period
RUN = 500_000              # 0.5 s: five quota periods


def scenario(isolated: bool, noisy_vcpus: int):
    """A noisy VM spinning on ``noisy_vcpus`` vCPUs and a management VM serving a request every
    ``INTERVAL``. Isolated: user VMs in machine.slice/user-vms under cpu.max 1.5 CPUs, the
    management VM in mgmt.slice/0. Otherwise: both in one group, no quota."""
    cpu = HostCpu(NCPUS, tick_us=TICK)
    noisy = Task("noisy", vcpus=noisy_vcpus)
    mgmt = WorkTask("mgmt", cost_us=COST, interval_us=INTERVAL)
    if isolated:
        cpu.cgroup("machine.slice/user-vms", max_quota_us=USER_QUOTA).attach(noisy)
        cpu.cgroup("mgmt.slice/0").attach(mgmt)
    else:
        flat = cpu.cgroup("machine.slice")
        flat.attach(noisy)
        flat.attach(mgmt)
    cpu.run(RUN)
    return cpu, mgmt


def latency_bound(cpu: HostCpu, mgmt: WorkTask) -> float:
    """The model's bound for an item of COST arriving when the VM is idle: at the guaranteed
    rate (one vCPU at most) it needs ceil(COST / rate / tick) ticks, plus up to one tick
    because an item waits for the next tick and completions may be reported a tick late."""
    rate = min(1.0, cpu.guaranteed_cpus(mgmt.cgroup))
    assert COST / rate <= INTERVAL, "items would queue behind each other"
    return math.ceil(COST / rate / TICK) * TICK + TICK


@pytest.mark.parametrize("noisy_vcpus", [2, 8, 32])
def test_isolated_mgmt_vm_keeps_latency_and_cpu(noisy_vcpus):
    cpu, mgmt = scenario(True, noisy_vcpus)
    assert cpu.guaranteed_cpus(mgmt.cgroup) == pytest.approx(1.0)
    bound = latency_bound(cpu, mgmt)
    assert bound == 300
    assert len(mgmt.done) == RUN // INTERVAL and mgmt.backlog == 0
    assert max(mgmt.latencies) <= bound
    assert max(mgmt.latencies) == pytest.approx(COST)       # it never waits at all
    rep = cpu.report()
    # The management VM gets exactly what it asks: 200 us per 1 ms.
    assert rep["mgmt.slice/0"]["cpus"] == pytest.approx(COST / INTERVAL)
    # The noisy VM is held to its quota in every period, so 0.3 CPU stays idle.
    user = rep["machine.slice/user-vms"]
    assert user["cpus"] == pytest.approx(USER_QUOTA / 100_000)
    assert user["nr_periods"] == user["nr_throttled"] == RUN // 100_000
    assert user["throttled_us"] > 0
    assert cpu.busy_us / cpu.now == pytest.approx(1.5 + COST / INTERVAL)


@pytest.mark.parametrize("noisy_vcpus", [2, 8])
def test_one_group_shares_per_vcpu_and_latency_grows(noisy_vcpus):
    """In one group the management VM's one thread gets 2/(v+1) CPU next to v busy vCPUs:
    each request takes COST * (v+1) / 2."""
    cpu, mgmt = scenario(False, noisy_vcpus)
    expected = COST * (noisy_vcpus + 1) / NCPUS
    assert max(mgmt.latencies) == pytest.approx(expected)
    assert len(mgmt.done) == RUN // INTERVAL          # it still keeps up (expected < INTERVAL)
    assert cpu.busy_us == pytest.approx(NCPUS * RUN)  # and nothing is ever idle


def test_isolation_beats_one_group_by_far():
    iso_cpu, iso = scenario(True, 8)
    _, flat = scenario(False, 8)
    assert max(flat.latencies) >= 4 * max(iso.latencies)
    assert max(flat.latencies) > 2 * latency_bound(iso_cpu, iso)
    # With 32 noisy vCPUs the management VM gets 2/33 CPU, less than the 0.2 it needs:
    # its backlog and latency grow without bound.
    cpu, starved = scenario(False, 32)
    assert starved.usage_us / cpu.now == pytest.approx(NCPUS / 33)
    assert starved.backlog > 300
    assert max(starved.latencies) > 1_000 * max(iso.latencies)


def test_weight_split_flat_and_nested():
    cpu = HostCpu(2)
    a = cpu.cgroup("a", weight=300).attach(Task("a", vcpus=2))
    b = cpu.cgroup("b", weight=100).attach(Task("b", vcpus=2))
    cpu.run(10_000)
    assert a.usage_us / cpu.now == pytest.approx(1.5)
    assert b.usage_us / cpu.now == pytest.approx(0.5)

    cpu = HostCpu(2)
    vms = [cpu.cgroup(f"machine.slice/vm{i}").attach(Task(f"vm{i}", vcpus=2)) for i in range(2)]
    mg = cpu.cgroup("mgmt.slice/0").attach(Task("mgmt", vcpus=2))
    cpu.run(10_000)
    assert [v.usage_us / cpu.now for v in vms] == pytest.approx([0.5, 0.5])
    assert mg.usage_us / cpu.now == pytest.approx(1.0)


def test_vcpus_cap_a_group_and_the_rest_goes_to_siblings():
    """A one-vCPU VM cannot use its 1.5 CPU weight share; the sibling gets the other CPU."""
    cpu = HostCpu(2)
    one = cpu.cgroup("one", weight=300).attach(Task("one", vcpus=1))
    busy = cpu.cgroup("busy", weight=100).attach(Task("busy", vcpus=4))
    cpu.run(10_000)
    assert one.usage_us / cpu.now == pytest.approx(1.0)
    assert busy.usage_us / cpu.now == pytest.approx(1.0)


def test_quota_throttles_and_leaves_cpus_idle():
    cpu = HostCpu(2)
    g = cpu.cgroup("capped", max_quota_us=50_000, period_us=100_000)
    g.attach(Task("spin", vcpus=4))
    cpu.run(1_000_000)
    st = cpu.report()["capped"]
    assert st["cpus"] == pytest.approx(0.5)
    assert st["nr_periods"] == st["nr_throttled"] == 10
    # 2 CPUs burn the 50 ms quota in 25 ms; throttled the remaining 75 ms of each period.
    assert st["throttled_us"] == 10 * 75_000
    assert cpu.busy_us / cpu.now == pytest.approx(0.5)


def test_quota_not_reached_is_not_throttled_and_short_periods():
    cpu = HostCpu(2)
    under = cpu.cgroup("under", max_quota_us=50_000).attach(Task("t", demand_us=40_000))
    short = cpu.cgroup("short", max_quota_us=5_000, period_us=20_000)
    short.attach(Task("s", vcpus=2))
    cpu.run(200_000)
    rep = cpu.report()
    assert under.usage_us == pytest.approx(2 * 40_000)
    assert rep["under"]["nr_periods"] == 2 and rep["under"]["nr_throttled"] == 0
    assert rep["short"]["cpus"] == pytest.approx(0.25)
    assert rep["short"]["nr_throttled"] == 10


def test_parent_quota_limits_the_subtree():
    cpu = HostCpu(4)
    cpu.cgroup("machine.slice", max_quota_us=100_000)
    kids = [cpu.cgroup(f"machine.slice/vm{i}").attach(Task(f"vm{i}", vcpus=4)) for i in range(2)]
    cpu.run(300_000)
    rep = cpu.report()
    assert rep["machine.slice"]["cpus"] == pytest.approx(1.0)
    assert [k.usage_us / cpu.now for k in kids] == pytest.approx([0.5, 0.5])
    assert rep["machine.slice"]["nr_throttled"] == 3
    assert rep["machine.slice/vm0"]["nr_throttled"] == 0      # it has no quota of its own


def test_work_conserving():
    """A heavy-weight group that wants little leaves the rest to a light one: no idle CPU."""
    cpu = HostCpu(2)
    heavy = cpu.cgroup("heavy", weight=10_000).attach(Task("h", vcpus=2, demand_us=30_000))
    light = cpu.cgroup("light", weight=1).attach(Task("l", vcpus=2))
    cpu.run(1_000_000)
    assert heavy.usage_us / cpu.now == pytest.approx(0.3)
    assert light.usage_us / cpu.now == pytest.approx(1.7)
    assert cpu.busy_us == pytest.approx(2 * cpu.now)


def test_work_items_are_served_in_order():
    cpu = HostCpu(1)
    w = cpu.root.attach(WorkTask("w"))
    for _ in range(3):
        w.submit(0, 200)
    w.submit(150, 100)            # waits for the tick at 200 and for the three before it
    cpu.run(2_000)
    assert w.done == [(0, 200), (0, 400), (0, 600), (150, 700)]
    assert w.latencies == [200, 400, 600, 550]


def test_random_trees_keep_weight_share_quota_and_work_conservation():
    rng = random.Random(1234)
    for trial in range(20):
        cpu = HostCpu(rng.randint(1, 4), tick_us=100)
        leaves = []
        for p in range(rng.randint(1, 3)):
            quota = rng.choice([None, None, rng.randint(10, 300) * 1_000])
            cpu.cgroup(f"p{p}", weight=rng.randint(1, 500), max_quota_us=quota)
            for c in range(rng.randint(1, 3)):
                leaf = cpu.cgroup(f"p{p}/c{c}", weight=rng.randint(1, 500),
                                  max_quota_us=rng.choice([None, 20_000, 60_000]))
                for k in range(rng.randint(1, 3)):
                    demand = rng.choice([None, rng.randint(0, 100) * 1_000])
                    leaf.attach(Task(f"t{p}{c}{k}", vcpus=rng.randint(1, 3), demand_us=demand))
                leaves.append(leaf)
        groups = list(cpu.root.walk())
        used = {}
        for _ in range(400):
            now = cpu.now
            cpu.step()
            root = cpu.root
            assert root.last_grant_us == pytest.approx(min(root.last_cap_us,
                                                           cpu.ncpus * cpu.tick_us))
            for g in groups:
                assert g.last_grant_us <= g.last_cap_us + EPS
                if g.max_quota_us is not None:
                    key = (g.path, now // g.period_us)
                    used[key] = used.get(key, 0) + g.last_grant_us
                    assert used[key] <= g.max_quota_us + EPS
                kids = list(g.children.values())
                if not kids:
                    continue
                assert sum(k.last_grant_us for k in kids) == pytest.approx(g.last_grant_us)
                runnable = [k for k in kids if k.last_cap_us > EPS]
                wsum = sum(k.weight for k in runnable)
                for k in runnable:
                    share = g.last_grant_us * k.weight / wsum
                    assert k.last_grant_us >= min(k.last_cap_us, share) - 1e-6


def test_validation():
    with pytest.raises(ValueError):
        CpuCgroup("g", weight=0)
    with pytest.raises(ValueError):
        CpuCgroup("g", max_quota_us=500)
    with pytest.raises(ValueError):
        CpuCgroup("g", max_quota_us=10_000, period_us=2_000_000)
    cpu = HostCpu(2)
    cpu.cgroup("a/b")
    with pytest.raises(ValueError):
        cpu.cgroup("a").attach(Task("t"))           # tasks only in leaves
    cpu.cgroup("a/b").attach(Task("t"))
    with pytest.raises(ValueError):
        cpu.cgroup("a/b/c")                         # no child under a group with tasks
    with pytest.raises(ValueError):
        cpu.remove("a/b")                           # not empty
    with pytest.raises(ValueError):
        cpu.cgroup("odd", period_us=1_050, max_quota_us=1_000)   # not a whole number of ticks
    with pytest.raises(ValueError):
        WorkTask("w", interval_us=1_000)            # periodic work needs a cost
