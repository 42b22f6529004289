"""A deterministic model of the host's CPU control with cgroup v2 (``cpu.weight``, ``cpu.max``).

It is good enough to show what the host-side management VMs rely on: a management VM in its
own cgroup (``mgmt.slice/<task>``) keeps its CPU and its request latency while a noisy user VM
in ``machine.slice/...`` wants every CPU of the host.

The model:

* Time advances in ticks of ``tick_us``. Each tick, ``ncpus * tick_us`` of CPU time is shared
  out as a fluid (generalized processor sharing) scheduler would: at each level of the
  hierarchy a group's time is split among its runnable members in proportion to their weight,
  each member capped by what it can use in the tick (its runnable vCPUs, its demand, its
  remaining quota). The split is max-min fair (water-filling): a runnable member never gets
  less than its weight share of its parent's time, and what one member cannot use goes to the
  others (work-conserving).
* Members of a group are child groups (weight ``cpu.weight``) or, in a leaf group, tasks. A
  task is a VM: each of its runnable vCPU threads weighs the same (nice 0), so a VM with eight
  busy vCPUs gets eight times the share of a one-vCPU VM in the same group. Tasks live only in
  groups without child groups (cgroup v2's no-internal-process rule).
* ``cpu.max`` is enforced exactly: a group (with everything below it) uses at most
  ``max_quota_us`` in each of its periods, all periods starting at time 0; a group that wanted
  more is throttled until its next period, and the CPUs may go idle (quota is not
  work-conserving, by design).

Left out: time slices, wakeup preemption and CFS's vruntime history (shares are recomputed
every tick from what is runnable at its start; work that arrives during a tick waits for the
next one), load balancing, migration, cache and SMT effects, the 5 ms quota slices Linux hands
out per CPU (which let a group overrun its quota slightly) and ``cpu.max.burst``. A task's CPU
time in a tick is spread evenly over the tick, so a work item's completion time is exact when
the task is contended all tick and up to one tick late otherwise.
"""

import heapq
from collections import deque

__all__ = ["CpuCgroup", "Task", "WorkTask", "HostCpu", "EPS"]

EPS = 1e-6          # microseconds: CPU-time comparisons are done in floating point


def _waterfill(amount: float, members: list[tuple[float, float]]) -> list[float]:
    """Split ``amount`` among ``(weight, cap)`` members: weighted max-min fair."""
    grants = [0.0] * len(members)
    active = [i for i, (w, cap) in enumerate(members) if cap > EPS and w > 0]
    while active and amount > EPS:
        wsum = sum(members[i][0] for i in active)
        capped = [i for i in active
                  if members[i][1] - grants[i] <= amount * members[i][0] / wsum + EPS]
        if not capped:
            for i in active:
                grants[i] += amount * members[i][0] / wsum
            break
        for i in capped:
            amount -= members[i][1] - grants[i]
            grants[i] = members[i][1]
        active = [i for i in active if i not in capped]
    return grants


class Task:
    """A VM with ``vcpus`` threads. ``demand_us=None``: always runnable on every vCPU (a noisy
    VM); otherwise it wants ``demand_us`` of CPU time in each ``period_us`` (periods from time
    0) and sleeps once it has had it."""

    def __init__(self, name: str, vcpus: int = 1, demand_us: float | None = None,
                 period_us: int = 100_000):
        if vcpus < 1:
            raise ValueError(f"{name}: vcpus must be >= 1, got {vcpus}")
        if demand_us is not None and not 0 <= demand_us <= vcpus * period_us:
            raise ValueError(f"{name}: demand_us must be in 0..vcpus*period_us, got {demand_us}")
        self.name = name
        self.vcpus = vcpus
        self.demand_us = demand_us
        self.period_us = period_us
        self.cgroup: "CpuCgroup | None" = None
        self.usage_us = 0.0
        self.last_want_us = 0.0     # last tick: what it could use
        self._period = -1
        self._got = 0.0

    def want(self, now: int, tick_us: int) -> float:
        """CPU time it can use in the tick starting at ``now``."""
        if self.demand_us is None:
            return float(self.vcpus * tick_us)
        p = now // self.period_us
        if p != self._period:
            self._period, self._got = p, 0.0
        return max(0.0, min(self.vcpus * tick_us, self.demand_us - self._got))

    def run(self, now: int, tick_us: int, granted: float) -> None:
        """Account ``granted`` CPU time in the tick starting at ``now``."""
        self.usage_us += granted
        self._got += granted

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"


class WorkTask(Task):
    """A one-vCPU VM serving discrete work items in arrival order (a management VM serving
    requests). Items come from :meth:`submit` and, with ``interval_us``, one of ``cost_us``
    every ``interval_us`` from ``start_us`` on. An item is runnable from the first tick that
    starts at or after its arrival; :attr:`done` holds ``(arrival_us, finish_us)`` per item."""

    def __init__(self, name: str, cost_us: float | None = None, interval_us: int | None = None,
                 start_us: int = 0):
        super().__init__(name, vcpus=1, demand_us=0)
        if interval_us is not None and (interval_us <= 0 or cost_us is None):
            raise ValueError(f"{name}: periodic work needs interval_us > 0 and cost_us")
        self.cost_us = cost_us
        self.interval_us = interval_us
        self._next = start_us if interval_us is not None else None
        self._future: list[tuple[float, int, float]] = []      # heap: (arrival, seq, cost)
        self._seq = 0
        self._ready: deque[list[float]] = deque()               # [arrival, remaining]
        self.done: list[tuple[float, float]] = []

    def submit(self, at_us: float, cost_us: float | None = None) -> None:
        """Add one item arriving at ``at_us`` needing ``cost_us`` (default: the task's)."""
        cost = self.cost_us if cost_us is None else cost_us
        if cost is None or cost <= 0:
            raise ValueError(f"{self.name}: an item needs cost_us > 0")
        heapq.heappush(self._future, (at_us, self._seq, cost))
        self._seq += 1

    @property
    def latencies(self) -> list[float]:
        """Completion latency of each finished item, in finishing order (us)."""
        return [f - a for a, f in self.done]

    @property
    def backlog(self) -> int:
        """Items arrived or scheduled but not finished."""
        return len(self._ready) + len(self._future)

    def want(self, now: int, tick_us: int) -> float:
        while self._next is not None and self._next <= now:
            self.submit(self._next)
            self._next += self.interval_us
        while self._future and self._future[0][0] <= now:
            at, _, cost = heapq.heappop(self._future)
            self._ready.append([at, cost])
        return min(float(tick_us), sum(item[1] for item in self._ready))

    def run(self, now: int, tick_us: int, granted: float) -> None:
        super().run(now, tick_us, granted)
        rate = granted / tick_us            # the grant spread evenly over the tick
        spent = 0.0
        while self._ready and granted - spent > EPS:
            item = self._ready[0]
            use = min(item[1], granted - spent)
            item[1] -= use
            spent += use
            if item[1] <= EPS:
                self._ready.popleft()
                self.done.append((item[0], now + spent / rate))


class CpuCgroup:
    """A cgroup with the CPU controller: ``cpu.weight`` (1..10000) and ``cpu.max``
    (``max_quota_us`` per ``period_us``; ``None`` is "max", no limit).

    Statistics as in ``cpu.stat``: :attr:`usage_us` (this group and everything below it) and,
    with a quota, :attr:`nr_periods` (periods in which it was runnable), :attr:`nr_throttled`
    (periods in which it was throttled) and :attr:`throttled_us`. The group is throttled for a
    tick when it starts the tick runnable with its quota used up."""

    def __init__(self, name: str, weight: int = 100, max_quota_us: int | None = None,
                 period_us: int = 100_000):
        if "/" in name or not name:
            raise ValueError(f"bad cgroup name {name!r}")
        self.name = name
        self.parent: "CpuCgroup | None" = None
        self.children: dict[str, "CpuCgroup"] = {}
        self.tasks: list[Task] = []
        self.weight = 100
        self.max_quota_us: int | None = None
        self.period_us = 100_000
        self.set_weight(weight)
        self.set_max(max_quota_us, period_us)
        self.usage_us = 0.0
        self.nr_periods = 0
        self.nr_throttled = 0
        self.throttled_us = 0
        self.last_want_us = 0.0     # last tick: what the group could have used (before quota)
        self.last_cap_us = 0.0      # last tick: the same after its quota
        self.last_grant_us = 0.0    # last tick: what it got
        self._period = -1
        self._used = 0.0            # in the current period
        self._counted = False
        self._throttled = False

    # ---- interface files ----
    def set_weight(self, weight: int) -> None:
        """``cpu.weight``."""
        if not 1 <= weight <= 10_000:
            raise ValueError(f"cpu.weight must be in 1..10000, got {weight}")
        self.weight = weight

    def set_max(self, quota_us: int | None, period_us: int | None = None) -> None:
        """``cpu.max``: ``quota_us`` (``None`` = max) per ``period_us`` (1 ms .. 1 s)."""
        period = self.period_us if period_us is None else period_us
        if not 1_000 <= period <= 1_000_000:
            raise ValueError(f"cpu.max period must be in 1000..1000000 us, got {period}")
        if quota_us is not None and quota_us < 1_000:
            raise ValueError(f"cpu.max quota must be >= 1000 us, got {quota_us}")
        self.max_quota_us, self.period_us = quota_us, period

    # ---- hierarchy ----
    @property
    def path(self) -> str:
        """Path below the root ("" for the root), e.g. ``machine.slice/user-vms``."""
        if self.parent is None:
            return ""
        return f"{self.parent.path}/{self.name}".lstrip("/")

    def add_child(self, child: "CpuCgroup") -> "CpuCgroup":
        if self.tasks:
            raise ValueError(f"{self.path or '/'} holds tasks: no child groups")
        if child.parent is not None or child.name in self.children:
            raise ValueError(f"cannot add {child.name!r} under {self.path or '/'}")
        child.parent = self
        self.children[child.name] = child
        return child

    def attach(self, task: Task) -> Task:
        if self.children:
            raise ValueError(f"{self.path or '/'} has child groups: tasks go in leaves")
        if task.cgroup is not None:
            task.cgroup.detach(task)
        task.cgroup = self
        self.tasks.append(task)
        return task

    def detach(self, task: Task) -> None:
        self.tasks.remove(task)
        task.cgroup = None

    def cpu_stat(self) -> dict:
        return {"usage_us": self.usage_us, "nr_periods": self.nr_periods,
                "nr_throttled": self.nr_throttled, "throttled_us": self.throttled_us}

    # ---- one tick (called by HostCpu) ----
    def _plan(self, now: int, tick_us: int) -> float:
        """Bottom-up: what this group can use in the tick, after its quota."""
        for t in self.tasks:
            t.last_want_us = t.want(now, tick_us)
        want = sum(t.last_want_us for t in self.tasks)
        want += sum(c._plan(now, tick_us) for c in self.children.values())
        self.last_want_us = want
        cap = want
        if self.max_quota_us is not None:
            p = now // self.period_us
            if p != self._period:
                self._period, self._used, self._counted, self._throttled = p, 0.0, False, False
            left = max(0.0, self.max_quota_us - self._used)
            if want > EPS and not self._counted:
                self.nr_periods += 1
                self._counted = True
            if want > EPS and left <= EPS:
                self.throttled_us += tick_us
                if not self._throttled:
                    self.nr_throttled += 1
                    self._throttled = True
            cap = min(want, left)
        self.last_cap_us = cap
        return cap

    def _give(self, amount: float, now: int, tick_us: int) -> None:
        """Top-down: take ``amount`` (at most the planned cap) and split it among members."""
        self.last_grant_us = amount
        self.usage_us += amount
        if self.max_quota_us is not None:
            self._used += amount
        if self.children:
            kids = list(self.children.values())
            for c, g in zip(kids, _waterfill(amount, [(c.weight, c.last_cap_us) for c in kids])):
                c._give(g, now, tick_us)
        else:
            shares = _waterfill(amount, [(t.vcpus, t.last_want_us) for t in self.tasks])
            for t, g in zip(self.tasks, shares):
                t.run(now, tick_us, g)

    def walk(self):
        """This group and every group below it, parents first."""
        yield self
        for c in self.children.values():
            yield from c.walk()

    def __repr__(self):
        return f"CpuCgroup({self.path or '/'!r}, weight={self.weight}, max={self.max_quota_us})"


class HostCpu:
    """The host's ``ncpus`` CPUs and its cgroup tree (:attr:`root`), advanced in ticks."""

    def __init__(self, ncpus: int, tick_us: int = 100):
        if ncpus < 1 or tick_us < 1:
            raise ValueError("ncpus and tick_us must be >= 1")
        self.ncpus = ncpus
        self.tick_us = tick_us
        self.root = CpuCgroup("root")
        self.now = 0
        self.busy_us = 0.0

    def cgroup(self, path: str, **config) -> CpuCgroup:
        """The group at ``path`` (e.g. ``"mgmt.slice/0"``), created if missing (with missing
        parents at the defaults); ``config`` (weight, max_quota_us, period_us) is applied to it."""
        g = self.root
        for name in (p for p in path.split("/") if p):
            if name not in g.children:
                g.add_child(CpuCgroup(name))
            g = g.children[name]
        if "weight" in config:
            g.set_weight(config.pop("weight"))
        if config:
            g.set_max(config.pop("max_quota_us", g.max_quota_us), config.pop("period_us", None))
        if config:
            raise TypeError(f"unknown cgroup settings {sorted(config)}")
        if g.period_us % self.tick_us:
            raise ValueError(f"{path}: period {g.period_us} us is not a whole number of ticks")
        return g

    def find(self, path: str) -> CpuCgroup | None:
        """The group at ``path``, or None."""
        g = self.root
        for name in (p for p in path.split("/") if p):
            g = g.children.get(name)
            if g is None:
                return None
        return g

    def remove(self, path: str) -> None:
        """``rmdir``: the group must exist and hold no task and no child."""
        g = self.find(path)
        if g is None or g is self.root or g.children or g.tasks:
            raise ValueError(f"{path}: not an empty non-root group")
        del g.parent.children[g.name]
        g.parent = None

    def guaranteed_cpus(self, group: CpuCgroup) -> float:
        """The CPU rate ``group`` gets whenever it can use it, however busy everything else is:
        its weight fraction among all its siblings at every level, times ``ncpus``, limited by
        its own and its ancestors' ``cpu.max``."""
        share, limit, g = float(self.ncpus), float("inf"), group
        while g.parent is not None:
            share *= g.weight / sum(s.weight for s in g.parent.children.values())
            g = g.parent
        g = group
        while g is not None:
            if g.max_quota_us is not None:
                limit = min(limit, g.max_quota_us / g.period_us)
            g = g.parent
        return min(share, limit)

    def step(self) -> None:
        """Advance one tick."""
        cap = self.root._plan(self.now, self.tick_us)
        grant = min(cap, float(self.ncpus * self.tick_us))
        self.root._give(grant, self.now, self.tick_us)
        self.busy_us += grant
        self.now += self.tick_us

    def run(self, duration_us: int) -> None:
        """Advance ``duration_us`` (rounded up to whole ticks)."""
        end = self.now + duration_us
        while self.now < end:
            self.step()

    def report(self) -> dict[str, dict]:
        """Per group (by path, "" = root): ``cpu.stat`` plus ``cpus``, its mean CPU rate."""
        out = {}
        for g in self.root.walk():
            stat = g.cpu_stat()
            stat["cpus"] = g.usage_us / self.now if self.now else 0.0
            out[g.path] = stat
        return out
