"""The host side of management-task placement: host management VMs and the host agent.

The card firmware decides where each management task's VM runs (:mod:`firmware`). Each task
*t* has one owner in the card (``OWNER + 4*t``: :attr:`regmap.Owner.CARD` or ``HOST``);
the task's requests wait in a card FIFO (``REQ_PUSH``/``REQ_POP``) and only the owner's side
can pop them (the host's side is PF BAR2), so a request is served by the card or by the host
and never by both, whatever the host software does.

* :class:`HostAgent` speaks the placement protocol over the management mailbox: on START(t)
  it starts the task's :class:`HostMgmtVM` in its own cgroup (``mgmt.slice/<t>``, a sibling of
  the user VMs' ``machine.slice``) and answers READY(t); on STOP(t) it stops the VM once
  everything it popped is served and answers STOPPED(t). Both are idempotent, so a firmware
  that restarted mid-move can send them again.
* :class:`HostMgmtVM` pops and serves its task's requests while the card says the host owns
  the task. It reaches PF BAR2 through a ``card`` accessor (``await card.read(off)``,
  ``await card.write(off, value)``): in the co-simulation, PF BAR2 passed through to the VM
  (vfio); :class:`Bar2Access` adapts an :class:`~host_driver.offcard.OffcardDriver`.
* :class:`VhostBackend` is the user VMs' way in: each user VM posts request words on a
  :class:`VhostRing` in shared memory; the back-end pushes them into the task's card FIFO and
  completes them once popped, whichever side owns the task.

Mailbox words (31 bits): op [30:24], task [23:16], arg [15:0] (:func:`encode`).
:meth:`HostAgent.poll` and :meth:`HostAgent.serve` may run concurrently: a STOP that arrives
while a pop is in flight is answered only after the popped request is recorded.
"""

from enum import IntEnum

from regmap import MgmtBlockRegs as R, Owner, MboxMsg as M

from .cgroup import CpuCgroup, HostCpu, WorkTask

__all__ = ["Op", "encode", "decode", "Bar2Access", "VhostRing", "VhostBackend", "HostMgmtVM",
           "HostAgent", "VALID", "WORD_MASK", "MGMT_SLICE"]

VALID = M.VALID            # set in a popped FIFO or mailbox word
WORD_MASK = M.WORD_MASK    # request and mailbox words are 31-bit
MGMT_SLICE = "mgmt.slice"  # parent cgroup of the host management VMs


class Op(IntEnum):
    """Mailbox ops (:class:`regmap.MboxMsg`)."""
    START = M.START
    STOP = M.STOP
    READY = M.READY
    STOPPED = M.STOPPED
    REFUSED = M.REFUSED


encode = M.encode
decode = M.decode


class Bar2Access:
    """The ``card`` accessor over an :class:`~host_driver.offcard.OffcardDriver`'s PF BAR2."""

    def __init__(self, driver):
        self.driver = driver

    async def read(self, off: int) -> int:
        return await self.driver.mgmt_read(off)

    async def write(self, off: int, value: int) -> None:
        await self.driver.mgmt_write(off, value)


class RingFull(Exception):
    """A user VM posted on a ring with every slot in use."""


class VhostRing:
    """Memory one user VM shares with the back-end: ``size`` request slots and ``size`` used
    slots, with free-running indices (slot = index % size). The guest writes ``req`` and
    ``avail_idx``; the back-end writes ``used`` and ``used_idx``. A used entry is
    ``(id, word)``, ``id`` being the avail index the request was posted at."""

    def __init__(self, size: int = 16):
        if size < 1:
            raise ValueError("ring size must be >= 1")
        self.size = size
        self.req: list[int | None] = [None] * size
        self.used: list[tuple[int, int] | None] = [None] * size
        self.avail_idx = 0
        self.used_idx = 0
        self._reaped = 0          # guest side: used entries taken

    # ---- guest side ----
    def post(self, word: int) -> int:
        """Post a 31-bit request word; returns its id."""
        if not 0 <= word <= WORD_MASK:
            raise ValueError(f"request word must be 31-bit, got {word:#x}")
        if self.avail_idx - self._reaped >= self.size:
            raise RingFull(f"{self.size} requests outstanding")
        self.req[self.avail_idx % self.size] = word
        self.avail_idx += 1
        return self.avail_idx - 1

    def reap(self) -> list[tuple[int, int]]:
        """Completed requests since the last call, in completion order."""
        out = [self.used[i % self.size] for i in range(self._reaped, self.used_idx)]
        self._reaped = self.used_idx
        return out


class VhostBackend:
    """Forwards user VMs' requests for ``task`` from their rings into the card FIFO and
    completes them once popped.

    The back-end must be the only writer of ``REQ_PUSH + 4*task``. Then the card FIFO holds
    exactly the last ``REQ_LEVEL`` words it pushed, so ``pushed - REQ_LEVEL`` requests have been
    popped, by the host VM or by the card: that is when a request counts as served, whichever
    side owns the task. It pushes only while ``REQ_LEVEL`` shows room (the card side can only
    lower the level meanwhile), so the card never refuses one of its pushes; requests that do
    not fit wait on their ring. One :meth:`kick` at a time.
    """

    def __init__(self, task: int, card):
        self.task = task
        self.card = card
        self.rings: list[VhostRing] = []
        self.pushed = 0
        self.completed = 0
        self._next: list[int] = []          # per ring: the next avail index to take
        self._inflight: list[tuple[VhostRing, int, int]] = []   # (ring, id, word), push order

    def add_ring(self, ring: VhostRing) -> VhostRing:
        self.rings.append(ring)
        self._next.append(ring.avail_idx)
        return ring

    async def kick(self) -> int:
        """Complete what the card has popped, then push posted requests while the FIFO has
        room (rings in turn, one request each). Returns the number completed."""
        level = await self.card.read(R.REQ_LEVEL + 4 * self.task)
        done = max(0, min(len(self._inflight), self.pushed - level - self.completed))
        for ring, rid, word in self._inflight[:done]:
            ring.used[ring.used_idx % ring.size] = (rid, word)
            ring.used_idx += 1
        del self._inflight[:done]
        self.completed += done
        progress = True
        while progress:
            progress = False
            for i, ring in enumerate(self.rings):
                nxt = self._next[i]
                if level >= R.REQ_DEPTH:
                    return done
                if nxt == ring.avail_idx:
                    continue
                word = ring.req[nxt % ring.size]
                self._next[i] = nxt + 1
                await self.card.write(R.REQ_PUSH + 4 * self.task, word)
                self._inflight.append((ring, nxt, word))
                self.pushed += 1
                level += 1
                progress = True
        return done


class HostMgmtVM:
    """The host-side management VM of ``task``, running in ``cgroup``.

    :meth:`serve` pops and serves the task's requests while the card says the host owns the
    task; every served word is appended to :attr:`served`. A request popped is always served:
    the word is recorded as soon as the pop returns, even if :meth:`stop` was called meanwhile.
    With a ``cpu``, the VM is a :class:`~host_driver.system.cgroup.WorkTask` in ``cgroup`` and each
    served request is submitted to it as ``cost_us`` of work at ``cpu.now``.
    """

    def __init__(self, task: int, cgroup: CpuCgroup | None, card, cpu: HostCpu | None = None,
                 cost_us: float = 200, vhost: VhostBackend | None = None):
        self.task = task
        self.cgroup = cgroup
        self.card = card
        self.cpu = cpu
        self.vhost = vhost if vhost is not None else VhostBackend(task, card)
        self.work = WorkTask(f"mgmt-vm{task}", cost_us=cost_us)
        self.served: list[int] = []
        self.running = False
        self.popping = False        # a REQ_POP read is in flight

    def start(self) -> None:
        if self.cgroup is not None and self.work.cgroup is None:
            self.cgroup.attach(self.work)
        self.running = True

    def stop(self) -> None:
        """Pop no more. A pop in flight is still recorded (see :attr:`popping`); work already
        submitted to the CPU model still runs."""
        self.running = False

    async def owned(self) -> bool:
        return await self.card.read(R.OWNER + 4 * self.task) == Owner.HOST

    async def serve(self, budget: int = R.REQ_DEPTH) -> int:
        """Serve up to ``budget`` requests while running and the host owns the task; returns
        how many. The card refuses pops by a non-owner (they read 0), so the owner check only
        saves denied pops: ownership moving between it and the pop loses nothing."""
        n = 0
        while self.running and n < budget and await self.owned():
            self.popping = True
            try:
                word = await self.card.read(R.REQ_POP + 4 * self.task)
            finally:
                self.popping = False
            if not word & VALID:
                break
            self.served.append(word & WORD_MASK)
            if self.cpu is not None:
                self.work.submit(self.cpu.now)
            n += 1
        return n


class HostAgent:
    """The host side of the placement protocol for ``tasks``.

    Drive it with :meth:`poll` (mailbox) and :meth:`serve` (requests), or :meth:`step` for
    both. :attr:`vms` holds each task's VM once started (kept, stopped, after STOP);
    :attr:`vhost` each task's back-end, which forwards user VMs' requests whatever the owner.
    :attr:`log` records ``(event, task)``: ``start``/``stop`` when a VM starts or stops, and
    ``ready``/``stopped``/``refused`` when that reply is written to the mailbox.

    Replies go out in order. They wait in :attr:`outbox` while the H2C mailbox is full, and a
    STOPPED (with everything behind it) waits while its VM has a pop in flight.
    """

    def __init__(self, card, cpu: HostCpu | None = None, tasks=range(R.TASKS),
                 cost_us: float = 200):
        self.card = card
        self.cpu = cpu
        self.tasks = tuple(tasks)
        for t in self.tasks:
            if not 0 <= t < R.TASKS:
                raise ValueError(f"task {t} out of range 0..{R.TASKS - 1}")
        self.cost_us = cost_us
        self.vms: dict[int, HostMgmtVM] = {}
        self.vhost = {t: VhostBackend(t, card) for t in self.tasks}
        self.log: list[tuple[str, int]] = []
        self.outbox: list[tuple[int, int | None]] = []   # (word, task whose pop must finish)
        self._flushing = False

    @staticmethod
    def cgroup_path(task: int) -> str:
        return f"{MGMT_SLICE}/{task}"

    async def poll(self) -> int:
        """Send held replies, then handle every word waiting in the C2H mailbox; returns how
        many words were handled."""
        await self._flush()
        n = 0
        while (word := await self.card.read(R.MBOX_C2H)) & VALID:
            await self._handle(*decode(word))
            n += 1
        return n

    async def serve(self) -> int:
        """Let each running VM serve its task's requests, send held replies, then kick every
        back-end; returns the number of requests the VMs served."""
        n = 0
        for vm in list(self.vms.values()):
            if vm.running:
                n += await vm.serve()
        await self._flush()
        for backend in self.vhost.values():
            await backend.kick()
        return n

    async def step(self) -> int:
        await self.poll()
        return await self.serve()

    # ---- protocol ----
    async def _handle(self, op: int, task: int, arg: int) -> None:
        if task not in self.tasks or op not in (Op.START, Op.STOP):
            await self._send(Op.REFUSED, task, op)
        elif op == Op.START:
            vm = self.vms.get(task)
            if vm is None:
                cg = self.cpu.cgroup(self.cgroup_path(task)) if self.cpu is not None else None
                vm = self.vms[task] = HostMgmtVM(task, cg, self.card, cpu=self.cpu,
                                                 cost_us=self.cost_us, vhost=self.vhost[task])
            if not vm.running:
                vm.start()
                self.log.append(("start", task))
            await self._send(Op.READY, task)
        else:
            vm = self.vms.get(task)
            if vm is not None and vm.running:
                vm.stop()
                self.log.append(("stop", task))
            await self._send(Op.STOPPED, task, quiesce=vm is not None)

    async def _send(self, op: Op, task: int, arg: int = 0, quiesce: bool = False) -> None:
        self.outbox.append((encode(op, task, arg), task if quiesce else None))
        await self._flush()

    def _sendable(self) -> bool:
        _, quiesce = self.outbox[0]
        return quiesce is None or not self.vms[quiesce].popping

    async def _flush(self) -> None:
        """Write held replies to H2C, in order, as far as the mailbox has room."""
        if self._flushing:              # the flush under way sends what was just added
            return
        self._flushing = True
        try:
            while self.outbox and self._sendable():
                room = R.MBOX_DEPTH - (await self.card.read(R.MBOX_STAT) & 0xFF)
                if room <= 0:
                    return
                while room and self.outbox and self._sendable():
                    word, _ = self.outbox.pop(0)
                    await self.card.write(R.MBOX_H2C, word)
                    op, task, _ = decode(word)
                    self.log.append((Op(op).name.lower(), task))
                    room -= 1
        finally:
            self._flushing = False
