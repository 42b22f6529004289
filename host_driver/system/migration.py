"""Live migration of a VM with a directly assigned VF to a second server whose card holds a
reserved replacement VF.

:class:`MigrationOrchestrator` walks :class:`MigrationState` in order:

==============  ==========================================================================
SELECT_VM       the most loaded server, if above T1, offers its most loaded idle VM
SELECT_TARGET   another server below T2 with a free VF (the least loaded one)
DETECT_SRIOV    the VM holds a VF of its host by direct assignment (else the VF steps do
                nothing and the VM moves on its synthetic adapter alone)
RESERVE         a :class:`DummyVm` on the target reserves a replacement VF
                (:meth:`Server.reserve_vf`; losing the race for it refuses the migration)
RECONFIGURE     the running VM's configuration names the replacement VF
MOVE_MEMORY     pre-copy of the VM's memory while it runs on its source VF
MOVE_VF_STATE   the guest's traffic goes to the synthetic adapter, the source VF is quiesced
                and exported, the record (:func:`host_driver.system.vf_save.pack` format) is checked
                on the target and imported into the replacement VF (which stays stopped)
FORWARD         the VM pauses for the final copy (the blackout; frames for it are held) and
                resumes on the target on the synthetic adapter; frames that still reach the
                source are forwarded to the target
COMMISSION      the dummy's reservation becomes the VM's assignment, the target VF resumes
                and carries the guest's traffic, the network learns the VM's new place
RETIRE_DUMMY    the dummy VM goes
FREE_SOURCE     the source VF is released and the forwarding rule removed
DONE            committed
==============  ==========================================================================

After each state but DONE the optional ``failure_injector(state)`` runs; an exception from it
or from any step aborts: :meth:`MigrationOrchestrator._rollback` puts the VM back on its source
VF (moving the VF state back if the target VF has run), releases the target's VF and retires
the dummy. Frames are held, never dropped, while the VM is paused, and forwarded between the
servers while the network and the VM disagree on its place, so an abort loses nothing either.
Only one case cannot go back: a failure after FREE_SOURCE when the freed VF (and every other VF
of the source) has meanwhile been taken; the VM then stays, complete, on the target
(:attr:`Outcome.ROLLED_FORWARD`).

The frame model: :class:`Network` sends numbered frames to a VM (receive flow, ``vm.rx``) and
the guest sends its own (``vm.tx``); each one is recorded in a :class:`FrameLedger` with the
hops it took (``vf@A``, ``synthetic@A``, ``fwd@A``). A frame that meets a stopped VF is dropped
in the model, so a wrong order of steps shows up as loss.

Time is the injected :class:`Clock`'s; :class:`VirtualClock` advances only by what the
orchestrator charges (:class:`MigrationCosts`), and every charge lets other coroutines run.
"""

from __future__ import annotations

import asyncio
import threading
import zlib
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Awaitable, Callable, Iterable, Mapping, Protocol

from ..offcard import VENDOR_ID
from .vf_save import (Delivery, FrameLedger, SavedVf, VfHandle, VfRef, VfStateAccess, VDEV_VERSION,
                      VF_DEVICE_ID, pack, unpack)

__all__ = [
    "Clock", "VirtualClock", "SlotState", "VfSlot", "NoFreeVf", "VfBusy", "MigrationError",
    "Server", "DummyVm", "Datapath", "Vm", "Network", "MigrationState", "Outcome",
    "MigrationCosts", "MigrationResult", "MigrationOrchestrator", "FrameLedger", "Delivery",
]


# ---- time ------------------------------------------------------------------------------

class Clock(Protocol):
    def now_us(self) -> float: ...
    def sleep_us(self, us: float) -> Awaitable[None]: ...


class VirtualClock:
    """Simulated time that advances only when someone sleeps on it; each sleep yields to the
    event loop once, so other coroutines (guest traffic, other migrations) run between steps."""

    def __init__(self, start_us: float = 0.0) -> None:
        self.t_us = start_us

    def now_us(self) -> float:
        return self.t_us

    async def sleep_us(self, us: float) -> None:
        self.t_us += us
        await asyncio.sleep(0)


# ---- servers and their VFs ---------------------------------------------------------------

class SlotState(Enum):
    FREE = "free"
    RESERVED = "reserved"          # held by a dummy VM for a migration
    ASSIGNED = "assigned"          # directly assigned to a VM


@dataclass
class VfSlot:
    index: int
    handle: VfHandle
    state: SlotState = SlotState.FREE
    holder: str | None = None
    luid: int = 0


class NoFreeVf(Exception):
    """The server has no free VF."""


class VfBusy(Exception):
    """A VF operation by someone who does not hold it, or on a VF someone else holds."""


class MigrationError(Exception):
    """A rollback failed: the VM's state is not known."""


class Server:
    """A host with its own card: ``vfs`` VFs (index 1..vfs, like the card's), the VMs it runs,
    the frames it forwards.

    ``load`` is the host's own load; :attr:`load` adds that of the VMs it runs. Every change of
    a VF slot is one synchronous critical section under ``threading.Lock``: no ``await`` inside,
    so no coroutine can run in the middle of one, nor another thread. A VF has at most one holder
    at any time, and only its holder can hand it on or release it.
    """

    def __init__(self, name: str, vfs: int, load: float = 0.0,
                 card: VfStateAccess | None = None,
                 handles: Mapping[int, VfHandle] | None = None) -> None:
        if "@" in name:
            raise ValueError(f"server name {name!r}: '@' separates hops")
        self.name = name
        self.base_load = load
        self.card = card
        handles = dict(handles or {})
        self.slots = {i: VfSlot(i, handles.get(i, VfRef(i, 0x0100 + i))) for i in range(1, vfs + 1)}
        self.vms: dict[str, Vm] = {}
        self.dummies: dict[str, DummyVm] = {}
        self.forward: dict[str, Server] = {}
        self.forwarded: Counter[str] = Counter()
        self.dropped: list[tuple[str, int]] = []
        self.running: set[int] = set()
        self._lock = threading.Lock()
        self._luid_tag = zlib.crc32(name.encode()) << 32
        self._luids = 0

    def __repr__(self) -> str:
        return f"<Server {self.name} load {self.load:.2f} free {self.free_vfs()}>"

    @property
    def load(self) -> float:
        return self.base_load + sum(vm.load for vm in self.vms.values())

    def free_vfs(self) -> list[int]:
        return [i for i, s in self.slots.items() if s.state is SlotState.FREE]

    def slot(self, vf: int) -> VfSlot:
        return self.slots[vf]

    # each of these is a critical section
    def reserve_vf(self, owner: str) -> int:
        """Reserve a free VF for ``owner`` (a dummy VM); :class:`NoFreeVf` if none."""
        with self._lock:
            for s in self.slots.values():
                if s.state is SlotState.FREE:
                    s.state, s.holder = SlotState.RESERVED, owner
                    return s.index
            raise NoFreeVf(f"{self.name}: no free VF for {owner}")

    def assign_vf(self, owner: str, vf: int | None = None) -> int:
        """Assign a free VF (``vf``, or any) to ``owner`` directly."""
        with self._lock:
            if vf is None:
                free = [s for s in self.slots.values() if s.state is SlotState.FREE]
                if not free:
                    raise NoFreeVf(f"{self.name}: no free VF for {owner}")
                s = free[0]
            else:
                s = self.slots[vf]
                if s.state is not SlotState.FREE:
                    raise VfBusy(f"{self.name}: VF{vf} is {s.state.value} by {s.holder}")
            s.state, s.holder, s.luid = SlotState.ASSIGNED, owner, self._new_luid()
            return s.index

    def transfer(self, vf: int, holder: str, owner: str) -> None:
        """Turn ``holder``'s reservation of ``vf`` into an assignment to ``owner``."""
        with self._lock:
            s = self.slots[vf]
            if s.state is not SlotState.RESERVED or s.holder != holder:
                raise VfBusy(f"{self.name}: VF{vf} is {s.state.value} by {s.holder}, "
                             f"not reserved by {holder}")
            s.state, s.holder, s.luid = SlotState.ASSIGNED, owner, self._new_luid()

    def release(self, vf: int, holder: str) -> None:
        with self._lock:
            s = self.slots[vf]
            if s.state is SlotState.FREE or s.holder != holder:
                raise VfBusy(f"{self.name}: VF{vf} is {s.state.value} by {s.holder}, "
                             f"{holder} cannot release it")
            s.state, s.holder, s.luid = SlotState.FREE, None, 0

    def _new_luid(self) -> int:
        self._luids += 1
        return self._luid_tag | self._luids

    # the card, with the VFs' run state kept for the data path
    def _card(self) -> VfStateAccess:
        if self.card is None:
            raise RuntimeError(f"{self.name}: no card to reach the VF state through")
        return self.card

    def vf_running(self, vf: int | None) -> bool:
        return vf in self.running

    async def quiesce(self, vf: int) -> None:
        self.running.discard(vf)                 # it stops fetching as the quiesce starts
        await self._card().quiesce(self.slots[vf].handle)

    async def resume(self, vf: int) -> None:
        await self._card().resume(self.slots[vf].handle)
        self.running.add(vf)

    async def export_state(self, vf: int) -> bytes:
        return await self._card().export_state(self.slots[vf].handle)

    async def import_state(self, vf: int, blob: bytes) -> None:
        self.running.discard(vf)
        await self._card().import_state(self.slots[vf].handle, blob)

    # the data path
    def place(self, vm: Vm, network: Network, sriov: bool = True) -> None:
        """Start ``vm`` here (with a VF of its own if ``sriov``) and tell the network."""
        if vm.host is not None:
            raise ValueError(f"{vm.name} already runs on {vm.host.name}")
        if sriov:
            vm.vf = self.assign_vf(vm.name)
            self.running.add(vm.vf)
            vm.datapath = Datapath.VF
        vm.host = self
        self.vms[vm.name] = vm
        network.route[vm.name] = self

    def receive(self, vm_name: str, seq: int, hops: tuple[str, ...]) -> None:
        """A frame for ``vm_name`` reaches this server: to the VM if it is here, else along
        the forwarding rule, else it is dropped."""
        vm = self.vms.get(vm_name)
        if vm is not None:
            vm.receive(seq, hops, self)
        elif vm_name in self.forward:
            self.forwarded[vm_name] += 1
            self.forward[vm_name].receive(vm_name, seq, hops + (f"fwd@{self.name}",))
        else:
            self.dropped.append((vm_name, seq))


@dataclass(eq=False)
class DummyVm:
    """A placeholder VM on the target that holds the reserved replacement VF."""
    name: str
    server: Server
    vf: int | None = None
    retired: bool = False


# ---- the VM and the network ------------------------------------------------------------

class Datapath(Enum):
    VF = "vf"                      # the VF of its host, directly
    SYNTHETIC = "synthetic"        # the synthetic adapter, through its host's VM switch


class Vm:
    """A guest VM: where it runs, which path its frames take, its two frame ledgers."""

    def __init__(self, name: str, load: float, clock: Clock, memory_mb: int = 1024) -> None:
        self.name = name
        self.load = load
        self.memory_mb = memory_mb
        self.rx = FrameLedger(clock.now_us)              # network -> guest
        self.tx = FrameLedger(clock.now_us)              # guest -> network
        self.host: Server | None = None
        self.vf: int | None = None                       # its VF on ``host``
        self.datapath = Datapath.SYNTHETIC
        self.paused = False
        self.migrating = False
        self.config_vf: tuple[str, int] | None = None    # the replacement VF its config names
        self._held_rx: list[tuple[int, tuple[str, ...], Server]] = []
        self._held_tx: list[int] = []

    def __repr__(self) -> str:
        where = self.host.name if self.host else "-"
        return f"<Vm {self.name} on {where} {self.datapath.value} vf {self.vf}>"

    def _carry(self, ledger: FrameLedger, seq: int, hops: tuple[str, ...]) -> None:
        assert self.host is not None
        if self.datapath is Datapath.VF and not self.host.vf_running(self.vf):
            ledger.drop(seq, f"stopped VF{self.vf}@{self.host.name}")
            return
        ledger.deliver(seq, hops + (f"{self.datapath.value}@{self.host.name}",))

    def receive(self, seq: int, hops: tuple[str, ...], at: Server) -> None:
        if self.paused:
            self._held_rx.append((seq, hops, at))
        else:
            self._carry(self.rx, seq, hops)

    def transmit(self, seq: int) -> None:
        """The guest sends frame ``seq`` (a paused guest's frames wait in its queue)."""
        self.tx.send(seq)
        if self.paused:
            self._held_tx.append(seq)
        else:
            self._carry(self.tx, seq, ())

    def pause(self) -> None:
        self.paused = True

    async def stop_and_copy(self, source: Server, target: Server, clock: Clock,
                            us: float) -> None:
        """The final copy of the paused VM's memory from ``source`` to ``target``: here only
        its cost in time (a VM with real memory copies it; :mod:`host_driver.system.live`)."""
        await clock.sleep_us(us)

    def resume(self) -> None:
        """Run again on ``host``: frames held elsewhere are forwarded here."""
        self.paused = False
        rx, self._held_rx = self._held_rx, []
        tx, self._held_tx = self._held_tx, []
        for seq, hops, at in rx:
            if at is not self.host:
                at.forwarded[self.name] += 1
                hops += (f"fwd@{at.name}",)
            self._carry(self.rx, seq, hops)
        for seq in tx:
            self._carry(self.tx, seq, ())


class Network:
    """The fabric: which server receives the frames addressed to each VM."""

    def __init__(self) -> None:
        self.route: dict[str, Server] = {}

    def send_to(self, vm: Vm, seq: int) -> None:
        vm.rx.send(seq)
        self.route[vm.name].receive(vm.name, seq, ())


# ---- the orchestrator --------------------------------------------------------------------

class MigrationState(Enum):
    SELECT_VM = "select_vm"
    SELECT_TARGET = "select_target"
    DETECT_SRIOV = "detect_sriov"
    RESERVE = "reserve"
    RECONFIGURE = "reconfigure"
    MOVE_MEMORY = "move_memory"
    MOVE_VF_STATE = "move_vf_state"
    FORWARD = "forward"
    COMMISSION = "commission"
    RETIRE_DUMMY = "retire_dummy"
    FREE_SOURCE = "free_source"
    DONE = "done"


class Outcome(Enum):
    DONE = "done"                          # the VM runs on the target's VF
    NOT_NEEDED = "not_needed"              # no server above T1, or no VM on it to move
    NO_TARGET = "no_target"                # no other server below T2 with a free VF
    REFUSED = "refused"                    # the target's free VF went to another migration
    ABORTED = "aborted"                    # a step failed: the VM runs on its source VF again
    ROLLED_FORWARD = "rolled_forward"      # failed after FREE_SOURCE, source VF gone: on target


@dataclass(frozen=True)
class MigrationCosts:
    """Simulated time the orchestrator charges (microseconds)."""
    step_us: float = 10.0                  # between two states
    precopy_us_per_mb: float = 1.0         # MOVE_MEMORY, while the VM runs
    state_transfer_us: float = 20.0        # the VF record from source to target
    stop_copy_us: float = 200.0            # the final copy while the VM is paused


@dataclass
class MigrationResult:
    outcome: Outcome
    reason: str = ""
    vm: str | None = None
    source: str | None = None
    target: str | None = None
    states: list[MigrationState] = field(default_factory=list)   # the states completed
    error: BaseException | None = None
    forwarded: int = 0                     # frames the source forwarded to the target
    paused_us: float = 0.0                 # time the VM spent paused for the final copy
    # the guest's frames since the migration began, read when asked: the first frame through
    # the target may arrive after migrate() has returned
    trace: Callable[[], tuple[float | None, float | None]] | None = \
        field(default=None, repr=False, compare=False)

    @property
    def last_source_us(self) -> float | None:
        """The guest's last frame through the source (so far)."""
        return self.trace()[0] if self.trace else None

    @property
    def first_target_us(self) -> float | None:
        """The guest's first frame through the target (None until one has come)."""
        return self.trace()[1] if self.trace else None

    @property
    def blackout_us(self) -> float | None:
        last, first = self.trace() if self.trace else (None, None)
        if last is None or first is None:
            return None
        return first - last


class _Stop(Exception):
    """A state ends the migration before anything moved (not a failure)."""

    def __init__(self, outcome: Outcome, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome


@dataclass(eq=False)
class _Run:
    """One migration's choices and how far it got (what a rollback has to undo)."""
    source: Server | None
    vm: Vm | None
    target: Server | None = None
    sriov: bool = False
    svf: int | None = None
    tvf: int | None = None
    dummy: DummyVm | None = None
    blob: bytes = b""
    owns_vm: bool = False                  # this run set ``vm.migrating``
    marks: tuple[int, int] = (0, 0)
    forwarded0: int = 0
    paused_us: float = 0.0
    # progress
    src_stopped: bool = False              # the source VF was quiesced
    commissioned: bool = False             # the target VF is assigned to the VM
    tgt_running: bool = False              # the target VF runs (its state moved on)
    source_freed: bool = False
    move_started: bool = False             # (a subclass moving the VM by other means, e.g.
    move_done: bool = False                #  QEMU's own migration: host_driver.system.qemu)


Injector = Callable[[MigrationState], None]


class MigrationOrchestrator:
    """Moves VMs off servers above ``t1`` to servers below ``t2`` (module docstring).

    ``failure_injector(state)`` is a plain callable, run right after ``state`` completes and
    before the orchestrator yields; whatever it raises aborts the migration. Several
    :meth:`migrate` calls may run at once (one VM each); they meet only in the servers'
    VF slots.
    """

    def __init__(self, servers: Iterable[Server], network: Network, t1: float, t2: float, *,
                 clock: Clock | None = None, failure_injector: Injector | None = None,
                 costs: MigrationCosts = MigrationCosts(), vendor_id: int = VENDOR_ID,
                 device_id: int = VF_DEVICE_ID, version: int = VDEV_VERSION) -> None:
        self.servers = list(servers)
        self.network = network
        self.t1, self.t2 = t1, t2
        self.clock: Clock = clock or VirtualClock()
        self.failure_injector = failure_injector
        self.costs = costs
        self.vendor_id, self.device_id, self.version = vendor_id, device_id, version
        self._plan = [
            (MigrationState.SELECT_VM, self._select_vm),
            (MigrationState.SELECT_TARGET, self._select_target),
            (MigrationState.DETECT_SRIOV, self._detect_sriov),
            (MigrationState.RESERVE, self._reserve),
            (MigrationState.RECONFIGURE, self._reconfigure),
            (MigrationState.MOVE_MEMORY, self._move_memory),
            (MigrationState.MOVE_VF_STATE, self._move_vf_state),
            (MigrationState.FORWARD, self._forward),
            (MigrationState.COMMISSION, self._commission),
            (MigrationState.RETIRE_DUMMY, self._retire_dummy),
            (MigrationState.FREE_SOURCE, self._free_source),
        ]

    async def migrate(self, source: Server | None = None, vm: Vm | None = None
                      ) -> MigrationResult:
        """One migration: from ``source`` (default: the most loaded server) of ``vm``
        (default: its most loaded VM). Returns how it ended; raises only if a rollback fails."""
        run = _Run(source or (vm.host if vm else None), vm)
        res = MigrationResult(Outcome.DONE)
        state = MigrationState.SELECT_VM
        try:
            for state, step in self._plan:
                await step(run)
                res.states.append(state)
                if self.failure_injector is not None:
                    self.failure_injector(state)
                if state is not MigrationState.FREE_SOURCE:
                    await self.clock.sleep_us(self.costs.step_us)
        except _Stop as stop:
            res.outcome, res.reason = stop.outcome, str(stop)
        except Exception as e:
            where = "after" if state in res.states else "in"
            res.error, res.reason = e, f"{type(e).__name__} {where} {state.name}: {e}"
            if isinstance(e, NoFreeVf) and state is MigrationState.RESERVE and where == "in":
                res.outcome = Outcome.REFUSED
            else:
                res.outcome = Outcome.ABORTED
            if not await self._safe_rollback(run, e):
                res.outcome = Outcome.ROLLED_FORWARD
        else:
            res.states.append(MigrationState.DONE)
            res.reason = f"{run.vm.name}: {run.source.name} -> {run.target.name}"
        finally:
            if run.owns_vm:
                run.vm.migrating = False
        self._account(run, res)
        return res

    # ---- states ----
    async def _select_vm(self, run: _Run) -> None:
        src = run.source or max(self.servers, key=lambda s: s.load)
        if src.load <= self.t1:
            raise _Stop(Outcome.NOT_NEEDED, f"{src.name} load {src.load:.2f} is not above "
                                            f"T1 {self.t1:.2f}")
        vm = run.vm or max((v for v in src.vms.values() if not v.migrating),
                           key=lambda v: v.load, default=None)
        if vm is None or vm.migrating or vm.host is not src:
            raise _Stop(Outcome.NOT_NEEDED, f"{src.name}: no VM free to move")
        vm.migrating = run.owns_vm = True
        run.source, run.vm = src, vm
        run.marks = (len(vm.rx.deliveries), len(vm.tx.deliveries))
        run.forwarded0 = src.forwarded[vm.name]

    async def _select_target(self, run: _Run) -> None:
        others = [s for s in self.servers if s is not run.source]
        fit = [s for s in others if s.load < self.t2 and s.free_vfs()]
        if not fit:
            why = ", ".join(f"{s.name} load {s.load:.2f} free VFs {len(s.free_vfs())}"
                            for s in others) or "no other server"
            raise _Stop(Outcome.NO_TARGET, f"no server below T2 {self.t2:.2f} with a free VF "
                                           f"({why})")
        run.target = min(fit, key=lambda s: s.load)

    async def _detect_sriov(self, run: _Run) -> None:
        vm, src = run.vm, run.source
        if vm.vf is not None:
            s = src.slot(vm.vf)
            run.sriov = s.state is SlotState.ASSIGNED and s.holder == vm.name
        run.svf = vm.vf if run.sriov else None

    async def _reserve(self, run: _Run) -> None:
        if not run.sriov:
            return
        dummy = DummyVm(f"dummy:{run.vm.name}", run.target)
        run.tvf = dummy.vf = run.target.reserve_vf(dummy.name)
        run.dummy = run.target.dummies[dummy.name] = dummy

    async def _reconfigure(self, run: _Run) -> None:
        if run.sriov:
            run.vm.config_vf = (run.target.name, run.tvf)

    async def _move_memory(self, run: _Run) -> None:
        await self.clock.sleep_us(run.vm.memory_mb * self.costs.precopy_us_per_mb)

    async def _move_vf_state(self, run: _Run) -> None:
        if not run.sriov:
            return
        vm, src, tgt = run.vm, run.source, run.target
        vm.datapath = Datapath.SYNTHETIC             # before the VF stops fetching
        run.src_stopped = True
        await src.quiesce(run.svf)
        run.blob = await src.export_state(run.svf)
        slot = src.slot(run.svf)
        record = pack(SavedVf(run.svf, slot.handle.rid, slot.luid, run.blob, self.vendor_id,
                              self.device_id, self.version))
        await self.clock.sleep_us(self.costs.state_transfer_us)
        saved = unpack(record, self.version)          # the target checks it before its card
        await tgt.import_state(run.tvf, saved.state)

    async def _forward(self, run: _Run) -> None:
        vm, src, tgt = run.vm, run.source, run.target
        vm.pause()
        t0 = self.clock.now_us()
        await vm.stop_and_copy(src, tgt, self.clock, self.costs.stop_copy_us)
        src.forward[vm.name] = tgt
        del src.vms[vm.name]
        tgt.vms[vm.name] = vm
        vm.host, vm.vf, vm.datapath = tgt, None, Datapath.SYNTHETIC
        vm.resume()
        run.paused_us = self.clock.now_us() - t0

    async def _commission(self, run: _Run) -> None:
        vm, tgt = run.vm, run.target
        if run.sriov:
            tgt.transfer(run.tvf, run.dummy.name, vm.name)
            run.commissioned = True
            vm.vf = run.tvf
            await tgt.resume(run.tvf)
            run.tgt_running = True
            vm.datapath = Datapath.VF
        self.network.route[vm.name] = tgt
        vm.config_vf = None

    async def _retire_dummy(self, run: _Run) -> None:
        if run.dummy is not None:
            run.target.dummies.pop(run.dummy.name, None)
            run.dummy.retired = True

    async def _free_source(self, run: _Run) -> None:
        if run.sriov:
            run.source.release(run.svf, run.vm.name)
            run.source_freed = True
        run.source.forward.pop(run.vm.name, None)

    # ---- abort ----
    async def _safe_rollback(self, run: _Run, cause: BaseException) -> bool:
        try:
            return await self._rollback(run)
        except Exception as e:
            raise MigrationError(f"rollback of {run.vm.name if run.vm else '?'} failed "
                                 f"({type(e).__name__}: {e}) after {cause!r}") from e

    async def _rollback(self, run: _Run) -> bool:
        """Put the VM back on its source VF; release what the target holds for it. False if
        it cannot go back (the source VF was freed and no VF of the source is free)."""
        vm, src, tgt = run.vm, run.source, run.target
        if not run.owns_vm:
            return True
        svf_changed = False
        if run.source_freed:                 # first, before any await: take the VF back
            try:
                src.assign_vf(vm.name, run.svf)
            except VfBusy:
                try:
                    run.svf = src.assign_vf(vm.name)
                    svf_changed = True
                except NoFreeVf:
                    return False
            run.source_freed = False
        if vm.host is tgt:
            vm.pause()
            if run.tgt_running or svf_changed:
                blob = run.blob
                if run.tgt_running:
                    vm.datapath = Datapath.SYNTHETIC
                    run.tgt_running = False
                    await tgt.quiesce(run.tvf)
                    blob = await tgt.export_state(run.tvf)
                await src.import_state(run.svf, blob)
            await vm.stop_and_copy(tgt, src, self.clock, self.costs.stop_copy_us)   # back
            tgt.forward[vm.name] = src
            src.forward.pop(vm.name, None)
            del tgt.vms[vm.name]
            src.vms[vm.name] = vm
            vm.host, vm.vf, vm.datapath = src, run.svf, Datapath.SYNTHETIC
            vm.resume()
            self.network.route[vm.name] = src
            tgt.forward.pop(vm.name, None)
        else:
            src.forward.pop(vm.name, None)
            if vm.paused:
                vm.resume()
        if run.src_stopped:
            await src.resume(run.svf)
            run.src_stopped = False
        if run.sriov:
            vm.datapath = Datapath.VF
        self._release_target(run)
        return True

    @staticmethod
    def _release_target(run: _Run) -> None:
        """The end of every rollback: the target's VF released (by the dummy, or by the VM if
        it was commissioned), the dummy retired, the VM's configuration its own again."""
        if run.tvf is not None:
            run.target.release(run.tvf, run.vm.name if run.commissioned else run.dummy.name)
            run.tvf = None
        if run.dummy is not None:
            run.target.dummies.pop(run.dummy.name, None)
            run.dummy.retired = True
        run.vm.config_vf = None

    # ---- accounting ----
    def _account(self, run: _Run, res: MigrationResult) -> None:
        vm, src, tgt = run.vm, run.source, run.target
        if not run.owns_vm:
            return
        res.vm, res.source = vm.name, src.name
        res.target = tgt.name if tgt else None
        res.forwarded = src.forwarded[vm.name] - run.forwarded0
        res.paused_us = run.paused_us
        if tgt is None:
            return
        marks = run.marks

        def trace():
            seen = [d for ledger, mark in zip((vm.rx, vm.tx), marks)
                    for d in ledger.deliveries[mark:]]
            via = lambda d: d.hops[-1].split("@")[1]                    # noqa: E731
            return (max((d.t_us for d in seen if via(d) == src.name), default=None),
                    min((d.t_us for d in seen if via(d) == tgt.name), default=None))
        res.trace = trace
