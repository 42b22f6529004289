"""The unit tests' shared fakes: Python models of the card (and of the host memory behind a
:class:`host_driver.transport.Transport`) for the tests that exercise the host driver, the host
system models and the firmware without a simulator.

What each fake models, and who uses it:

* :class:`FakeMgmtBlock` -- the card's management block (:class:`regmap.MgmtBlockRegs`) with
  both of its sides: the firmware's (the management UART) and the host's (PF BAR2), through
  synchronous ports (:class:`FakePort`, for the firmware) or asynchronous ones
  (:class:`AsyncPort`, for :mod:`host_driver.system.mgmt_host`). :class:`FakeHostAgent` plays
  the host's half for the firmware tests, inside the card's accesses.
  (``test_firmware_mover``, ``test_firmware_policy``, ``test_mgmt_host``)
* :class:`FakeVfCard` -- the card's per-VF state export as the host system reaches it, the
  :class:`host_driver.system.vf_save.VfStateAccess` contract.
  (``test_vf_save``, ``test_migration``)
* :class:`FakeTransport` -- the host's side of a :class:`~host_driver.transport.Transport`:
  host memory as a bytearray with a bump allocator, MSI counts and a clock that moves only in
  ``sleep_ns``. It has no card: each test file subclasses it with the configuration space and
  MMIO of the card it models (PF BAR2 registers in ``test_iommu_model``, a virtio-net function
  in ``test_virtio_frontend``).

None of them imports the gateware: they are written from the contracts (the register map in
:mod:`regmap`, the host system's interfaces), so a test fails when the code under test and the
contract disagree.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict, deque
from typing import Callable

from host_driver.transport import MsiVector, Transport
from regmap import MgmtBlockRegs as R, Owner

__all__ = ["RESOURCES", "VALID", "M32", "OP_START", "OP_STOP", "OP_READY", "OP_STOPPED",
           "OP_REFUSED", "CardCrash", "FakePort", "AsyncPort", "FakeMgmtBlock", "FakeHostAgent",
           "CardError", "FakeVfCard", "FakeTransport"]


# ---- the management block ---------------------------------------------------------------------

RESOURCES = ("custom_hw", "processor", "memory", "network")
VALID = 1 << 31
M32 = 0xFFFF_FFFF

OP_START, OP_STOP, OP_READY, OP_STOPPED, OP_REFUSED = 0x01, 0x02, 0x11, 0x12, 0x13

CARD, HOST = "card", "host"

_TEL_ADDRS = (R.TEL_TX_BYTES, R.TEL_TX_FRAMES, R.TEL_RX_BYTES, R.TEL_RX_FRAMES, R.TEL_DMA_BUSY,
              R.TEL_FAULTS, R.TEL_OCC, R.TEL_QOS_WAIT)


class CardCrash(Exception):
    """The simulated firmware crash, raised from a card-side access
    (:meth:`FakeMgmtBlock.crash_on`)."""


Predicate = Callable[[str, str, int, int | None], bool]   # side, "r"/"w", addr, value


class FakePort:
    """One side's synchronous register port: ``read(addr)`` / ``write(addr, value)``, as the
    firmware's :class:`firmware.card.Card` expects of its UART link."""

    def __init__(self, block: "FakeMgmtBlock", side: str):
        self.card = block
        self.side = side

    def read(self, addr: int) -> int:
        return self.card.access(self.side, "r", addr)

    def write(self, addr: int, value: int) -> None:
        self.card.access(self.side, "w", addr, value)


class AsyncPort:
    """One side's register port for coroutines (what :class:`host_driver.system.mgmt_host.HostAgent`
    is given as PF BAR2). Every access yields to the event loop first, so concurrent coroutines
    interleave; while :attr:`FakeMgmtBlock.pop_gate` is set, a host-side ``REQ_POP`` read waits
    for that event before it takes effect."""

    def __init__(self, block: "FakeMgmtBlock", side: str):
        self.card = block
        self.side = side

    async def read(self, addr: int) -> int:
        await asyncio.sleep(0)
        gate = self.card.pop_gate
        if gate is not None and self.side == HOST and self.card._task(addr)[1] == R.REQ_POP:
            await gate.wait()
        return self.card.access(self.side, "r", addr)

    async def write(self, addr: int, value: int) -> None:
        await asyncio.sleep(0)
        self.card.access(self.side, "w", addr, value)


class FakeMgmtBlock:
    """A Python model of the card's management block (:class:`regmap.MgmtBlockRegs`).

    Two sides reach it: ``"card"`` (the management UART, the firmware's side) and ``"host"``
    (PF BAR2). :attr:`card_port` / :attr:`host_port` are synchronous ports of the two sides,
    :attr:`card_async` / :attr:`host_async` asynchronous ones (:class:`AsyncPort`). Addresses are
    BAR2 offsets; values are 32-bit (anything else raises ``ValueError``). Semantics modelled,
    as the RTL (:mod:`hdl.mgmt.block`) implements them:

    - ``OWNER + 4t``: one owner per task (:attr:`owners`), 1 card / 2 host; a write of any other
      32-bit value is refused and counted in ``OWNER_REFUSED``.
    - ``REQ_PUSH + 4t``: a FIFO of ``REQ_DEPTH`` 31-bit words per task (:attr:`fifos`); a push
      into a full FIFO is refused and counted in ``REQ_REFUSED``.
    - ``REQ_POP + 4t``: a read by the task's owner side pops (bit 31 set), else 0 (a non-owner
      read counts in ``POP_DENIED``). Every pop is recorded in :attr:`pop_log` with the side.
    - ``MBOX_H2C`` / ``MBOX_C2H``: ``MBOX_DEPTH`` 31-bit words each way; the receiving side pops
      (bit 31 set, 0 when empty), the sending side pushes; anything else does nothing. A push
      into a full FIFO counts in ``MBOX_STAT`` [31:16].
    - ``UTIL`` from :attr:`util`, ``CYCLES_LO/HI`` (HI latched by the LO read) from
      :attr:`cycles`, which advances by ``cycles_per_access`` on every access, and by
      :meth:`advance`.
    - ``QOS_*`` and ``TEL_*`` windows per function (:attr:`qos`, :attr:`tel`).

    Test controls: :meth:`crash_on` / :meth:`crash_at` make one chosen card-side access raise
    :class:`CardCrash`, before or after its effect, to simulate the firmware dying at that point;
    :attr:`hooks` run after every card-side access (:class:`FakeHostAgent` is one);
    ``before(side, kind, addr)``, when set, runs just before any access takes effect; while
    :attr:`pop_gate` (an ``asyncio.Event``) is set, host-side async ``REQ_POP`` reads wait for it.
    """

    def __init__(self, *, cycles_per_access: int = 100, cycles: int = 0):
        self.owners = [Owner.CARD] * R.TASKS
        self.fifos: list[deque[int]] = [deque() for _ in range(R.TASKS)]
        self.h2c: deque[int] = deque()
        self.c2h: deque[int] = deque()
        self.util = dict.fromkeys(RESOURCES, 0)
        self.cycles = cycles
        self.cycles_per_access = cycles_per_access
        self._hi_latch = 0
        self.owner_refused = self.pop_denied = self.req_refused = self.mbox_refused = 0
        self.pop_denied_by = {CARD: 0, HOST: 0}
        self.qos_sel = self.tel_sel = 0
        self.qos: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        self.tel: dict[int, dict[int, int]] = defaultdict(dict)
        self.pop_log: list[tuple[str, int, int]] = []         # (side, task, word)
        self.owner_log: list[tuple[str, int, int]] = []       # (side, task, value) accepted
        self.accesses = {CARD: 0, HOST: 0}
        self.hooks: list[Callable[[], None]] = []             # run after every card-side access
        self.before: Callable[[str, str, int], None] | None = None
        self.pop_gate: asyncio.Event | None = None
        self._crash: tuple[Predicate, bool] | None = None
        self.crash_skipped = False
        self.card_port = FakePort(self, CARD)
        self.host_port = FakePort(self, HOST)
        self.card_async = AsyncPort(self, CARD)
        self.host_async = AsyncPort(self, HOST)

    # -- test controls --------------------------------------------------------------------
    def port(self, side: str) -> FakePort:
        return {CARD: self.card_port, HOST: self.host_port}[side]

    def set_util(self, **values: int) -> None:
        for k, v in values.items():
            if k not in self.util:
                raise KeyError(k)
            self.util[k] = v

    def advance(self, cycles: int) -> None:
        self.cycles += cycles

    def push(self, task: int, word: int) -> bool:
        """The host pushes a request; True if the FIFO took it."""
        refused = self.req_refused
        self.host_port.write(R.REQ_PUSH + 4 * task, word)
        return self.req_refused == refused

    def crash_on(self, pred: Predicate, *, after: bool = False) -> None:
        """Make the next card-side access matching ``pred`` raise CardCrash (once); with
        ``after`` the access takes effect first."""
        self._crash = (pred, after)

    def crash_at(self, n: int, *, after: bool = False,
                 skip: Predicate | None = None) -> None:
        """Crash on the card-side access numbered ``n`` from now (0 = the next one)."""
        count = [0]
        self.crash_skipped = False

        def pred(side, kind, addr, value):
            hit = count[0] == n
            count[0] += 1
            if hit and skip and skip(side, kind, addr, value):
                self.crash_skipped = True
                return False
            return hit
        self.crash_on(pred, after=after)

    # -- the register file ----------------------------------------------------------------
    def access(self, side: str, kind: str, addr: int, value: int | None = None) -> int:
        """One register access by ``side`` ("card" / "host"): ``kind`` "r" returns the value
        read, "w" writes ``value`` (and returns 0)."""
        if addr % 4 or not 0 <= addr < 0x1000:
            raise ValueError(f"bad BAR2 address {addr:#x}")
        if kind == "w" and not 0 <= value <= M32:
            raise ValueError(f"write of {value!r} is not a 32-bit value")
        self.accesses[side] += 1
        self.cycles += self.cycles_per_access
        crash_after = False
        if side == CARD and self._crash is not None:
            pred, after = self._crash
            if pred(side, kind, addr, value):
                self._crash = None
                if not after:
                    raise CardCrash(f"crash before {kind} {addr:#x}")
                crash_after = True
        if self.before is not None:
            self.before(side, kind, addr)
        result = self._read(side, addr) if kind == "r" else self._write(side, addr, value) or 0
        if side == CARD:
            for hook in list(self.hooks):
                hook()
        if crash_after:
            raise CardCrash(f"crash after {kind} {addr:#x}")
        return result

    def _read(self, side: str, addr: int) -> int:
        if addr == R.BLOCK_ID:
            return R.BLOCK_ID_VALUE
        if addr == R.UTIL:
            return sum((self.util[r] & 0xFF) << (8 * i) for i, r in enumerate(RESOURCES))
        if addr == R.CYCLES_LO:
            self._hi_latch = (self.cycles >> 32) & M32
            return self.cycles & M32
        if addr == R.CYCLES_HI:
            return self._hi_latch
        if addr == R.TEL_SEL:
            return self.tel_sel
        if addr in _TEL_ADDRS:
            return self.tel[self.tel_sel].get(addr, 0) & M32
        if addr == R.QOS_SEL:
            return self.qos_sel
        if addr == R.QOS_RATE:
            return self.qos[self.qos_sel][0]
        if addr == R.QOS_BURST:
            return self.qos[self.qos_sel][1]
        if addr == R.MBOX_H2C:
            return self._mbox_pop(self.h2c) if side == CARD else 0
        if addr == R.MBOX_C2H:
            return self._mbox_pop(self.c2h) if side == HOST else 0
        if addr == R.MBOX_STAT:
            return len(self.h2c) | len(self.c2h) << 8 | (self.mbox_refused & 0xFFFF) << 16
        if addr == R.OWNER_REFUSED:
            return self.owner_refused
        if addr == R.POP_DENIED:
            return self.pop_denied
        if addr == R.REQ_REFUSED:
            return self.req_refused
        t, base = self._task(addr)
        if base == R.OWNER:
            return self.owners[t]
        if base == R.REQ_POP:
            if self.owners[t] != (Owner.CARD if side == CARD else Owner.HOST):
                self.pop_denied += 1
                self.pop_denied_by[side] += 1
                return 0
            if not self.fifos[t]:
                return 0
            word = self.fifos[t].popleft()
            self.pop_log.append((side, t, word))
            return word | VALID
        if base == R.REQ_LEVEL:
            return len(self.fifos[t])
        return 0

    def _write(self, side: str, addr: int, value: int) -> None:
        if addr == R.TEL_SEL:
            self.tel_sel = value & 0xFF
        elif addr == R.QOS_SEL:
            self.qos_sel = value & 0xFF
        elif addr == R.QOS_RATE:
            self.qos[self.qos_sel][0] = value & 0xFFFF
        elif addr == R.QOS_BURST:
            self.qos[self.qos_sel][1] = value & 0x7FFF
        elif addr == R.MBOX_H2C and side == HOST:
            self._mbox_push(self.h2c, value)
        elif addr == R.MBOX_C2H and side == CARD:
            self._mbox_push(self.c2h, value)
        else:
            t, base = self._task(addr)
            if base == R.OWNER:
                if value in (Owner.CARD, Owner.HOST):
                    self.owners[t] = value
                    self.owner_log.append((side, t, value))
                else:
                    self.owner_refused += 1
            elif base == R.REQ_PUSH:
                if len(self.fifos[t]) < R.REQ_DEPTH:
                    self.fifos[t].append(value & (VALID - 1))
                else:
                    self.req_refused += 1

    def _mbox_push(self, fifo: deque[int], value: int) -> None:
        if len(fifo) < R.MBOX_DEPTH:
            fifo.append(value & (VALID - 1))
        else:
            self.mbox_refused += 1

    @staticmethod
    def _mbox_pop(fifo: deque[int]) -> int:
        return fifo.popleft() | VALID if fifo else 0

    @staticmethod
    def _task(addr: int) -> tuple[int, int | None]:
        for base in (R.OWNER, R.REQ_PUSH, R.REQ_POP, R.REQ_LEVEL):
            if base <= addr < base + 4 * R.TASKS:
                return (addr - base) // 4, base
        return 0, None


class FakeHostAgent:
    """The host side for the firmware tests, run after every card-side access of ``card``
    (a :class:`FakeMgmtBlock`): starts a management VM on START (READY after
    ``ready_delay_cycles``, or REFUSED, or no answer when ``silent``), stops it on STOP
    (STOPPED), and while a VM runs pops its task's requests through the host port.
    (The real, asynchronous host agent is :class:`host_driver.system.mgmt_host.HostAgent`.)"""

    def __init__(self, card: FakeMgmtBlock, *, ready_delay_cycles: int = 0, refuse: bool = False,
                 silent: bool = False):
        self.card = card
        self.port = card.host_port
        self.ready_delay_cycles = ready_delay_cycles
        self.refuse = refuse
        self.silent = silent
        self.running: set[int] = set()
        self.starting: dict[int, int] = {}           # task -> cycle its READY is due
        self.served: list[tuple[int, int]] = []     # (task, word)
        self.messages: list[tuple[int, int]] = []   # (op, task) received
        card.hooks.append(self.tick)

    def detach(self) -> None:
        self.card.hooks.remove(self.tick)

    def _send(self, op: int, task: int) -> None:
        self.port.write(R.MBOX_H2C, op << 24 | task << 16)

    def tick(self) -> None:
        while (word := self.port.read(R.MBOX_C2H)) & VALID:
            op, task = (word >> 24) & 0x7F, (word >> 16) & 0xFF
            self.messages.append((op, task))
            if op == OP_START:
                if self.refuse:
                    self._send(OP_REFUSED, task)
                elif not self.silent:
                    self.starting[task] = self.card.cycles + self.ready_delay_cycles
            elif op == OP_STOP:
                self.starting.pop(task, None)
                self.running.discard(task)
                self._send(OP_STOPPED, task)
        for task, due in list(self.starting.items()):
            if self.card.cycles >= due:
                del self.starting[task]
                self.running.add(task)
                self._send(OP_READY, task)
        for task in sorted(self.running):
            if self.card.owners[task] != Owner.HOST:
                continue        # a real VM would pop and get 0; skip to keep the counters clean
            while (word := self.port.read(R.REQ_POP + 4 * task)) & VALID:
                self.served.append((task, word & (VALID - 1)))


# ---- the per-VF state export --------------------------------------------------------------------

class CardError(Exception):
    """A :class:`FakeVfCard` call that the test made fail (:attr:`FakeVfCard.fail`)."""


def _index(vf) -> int:
    """A VF index from an index or a VF handle (anything with ``.index``)."""
    return getattr(vf, "index", vf)


class FakeVfCard:
    """The card's per-VF state export: :class:`host_driver.system.vf_save.VfStateAccess`
    (``quiesce``, ``export_state``, ``import_state``, ``resume``), as the fast save / restore
    and the migration orchestrator call it.

    ``vfs`` are the VF indices; each VF holds a state blob of ``size`` bytes (:attr:`state`):
    bytes 0..7 its generation (u64), bumped by every resume (the device moves on when it runs),
    bytes 8..11 the frames it carried (u32, :meth:`port`; the state moves with traffic, as ring
    indices do), then random bytes (``seed``). Both counters start at 0; the VFs start running or
    stopped (``running``). An export and an import carry the whole blob, counters included.

    Every call is logged in :attr:`calls` as ``(op, index)``, snapshots ``observe()`` into
    :attr:`seen` when :attr:`observe` is set, yields ``yields`` times to the event loop, raises
    :class:`CardError` when :attr:`fail` names its op, and checks the contract: an export of a
    running VF, or a frame that reaches a stopped VF, fails an assertion. :attr:`exported` and
    :attr:`at_resume` keep the blobs exported and the states resumed from.

    The helpers take a VF index or a VF handle."""

    GEN = slice(0, 8)
    FRAMES = slice(8, 12)
    HEADER = 12

    def __init__(self, vfs, *, size: int = 608, seed: int = 1, yields: int = 1,
                 running: bool = False):
        rnd = random.Random(seed)
        self.state = {_index(vf): bytearray(bytes(self.HEADER) + rnd.randbytes(size - self.HEADER))
                      for vf in vfs}
        self.running = {i: running for i in self.state}
        self.calls: list[tuple[str, int]] = []
        self.exported: list[bytes] = []
        self.at_resume: list[bytes] = []
        self.resumed = 0
        self.yields = yields
        self.fail: str | None = None
        self.observe: Callable[[], object] | None = None
        self.seen: list = []

    async def _call(self, op, vf):
        self.calls.append((op, vf.index))
        if self.observe:
            self.seen.append(self.observe())
        for _ in range(self.yields):
            await asyncio.sleep(0)
        if self.fail == op:
            raise CardError(f"{op} failed on VF{vf.index}")

    # -- VfStateAccess ---------------------------------------------------------------------
    async def quiesce(self, vf):
        self.running[vf.index] = False
        await self._call("quiesce", vf)

    async def export_state(self, vf):
        await self._call("export_state", vf)
        assert not self.running[vf.index], "export of a running VF"
        self.exported.append(bytes(self.state[vf.index]))
        return self.exported[-1]

    async def import_state(self, vf, blob):
        self.running[vf.index] = False
        await self._call("import_state", vf)
        self.state[vf.index] = bytearray(blob)

    async def resume(self, vf):
        await self._call("resume", vf)
        self.at_resume.append(bytes(self.state[vf.index]))
        self._count(vf.index, self.GEN)
        self.running[vf.index] = True
        self.resumed += 1

    # -- test helpers ----------------------------------------------------------------------
    def _count(self, index, field):
        """Add 1 to the counter at ``field`` (a slice) of the VF's state, wrapping."""
        s = self.state[index]
        n = field.stop - field.start
        s[field] = ((int.from_bytes(s[field], "little") + 1) % (1 << 8 * n)).to_bytes(n, "little")

    def port(self, vf):
        """The VF's data path: a function that carries frame ``seq`` through the running VF."""
        index = _index(vf)

        def carry(seq):
            assert self.running[index], f"frame {seq} reached stopped VF{index}"
            self._count(index, self.FRAMES)
        return carry

    def frames(self, vf) -> int:
        """Frames the VF's state says it carried."""
        return int.from_bytes(self.state[_index(vf)][self.FRAMES], "little")

    def gen(self, vf) -> int:
        """The generation in the VF's state: the resumes it has been through, on any card."""
        return int.from_bytes(self.state[_index(vf)][self.GEN], "little")

    def resumes(self) -> int:
        """Resumes this card performed."""
        return self.resumed

    def wipe(self, vf):
        """The device state is lost (a function reset while the host is serviced)."""
        index = _index(vf)
        self.state[index] = bytearray(len(self.state[index]))


# ---- the host's side of a transport -----------------------------------------------------------

class FakeTransport(Transport):
    """The host's side of a :class:`~host_driver.transport.Transport`, with no card behind it.

    Host memory is a bytearray of ``size`` bytes at bus address ``base`` with a bump allocator
    (:attr:`next`; allocations are rounded up to ``granule`` bytes); accesses outside it fail an
    assertion. :meth:`peek` / :meth:`poke` are the card's (or the test's) direct view of it.
    MSI vectors are counted per message data in :attr:`msis` (:meth:`signal_msi` adds one).
    Time moves only in :meth:`sleep_ns` (and :meth:`wait_msi`, which sleeps its whole timeout),
    which then calls :attr:`on_sleep` when set.

    Configuration space, platform and MMIO raise ``NotImplementedError``: a subclass adds the
    card it models."""

    def __init__(self, *, base: int, size: int, granule: int = 1):
        self.base = base
        self.mem = bytearray(size)
        self.next = base
        self.granule = granule
        self.time = 0
        self.msis: dict[int, int] = {}
        self.on_sleep: Callable[[], None] | None = None

    # ---- host memory ----
    def alloc_host_mem(self, size):
        addr = self.next
        self.next += -(-size // self.granule) * self.granule
        assert self.next - self.base <= len(self.mem), "fake host memory exhausted"
        return addr

    def _off(self, addr, n):
        off = addr - self.base
        assert 0 <= off and off + n <= len(self.mem), f"bad host access {addr:#x}+{n}"
        return off

    def peek(self, addr, length):
        off = self._off(addr, length)
        return bytes(self.mem[off:off + length])

    def poke(self, addr, data):
        off = self._off(addr, len(data))
        self.mem[off:off + len(data)] = data

    async def host_read(self, addr, length):
        return self.peek(addr, length)

    async def host_write(self, addr, data):
        self.poke(addr, data)

    # ---- interrupts ----
    def alloc_msi_vectors(self, n):
        return [MsiVector(0xFEE0_0000, 0x40 + k) for k in range(n)]

    def msi_count(self, vector):
        return self.msis.get(vector.data, 0)

    def signal_msi(self, data):
        """A message with data ``data`` arrived."""
        self.msis[data] = self.msis.get(data, 0) + 1

    async def wait_msi(self, vector, count, timeout_ns):
        await self.sleep_ns(timeout_ns)
        return self.msi_count(vector) >= count

    # ---- time ----
    async def sleep_ns(self, ns):
        self.time += ns
        if self.on_sleep:
            self.on_sleep()

    def now_ns(self):
        return self.time

    # ---- the card: none here ----
    async def cfg_read(self, rid, offset, size=4):
        raise NotImplementedError("this fake transport has no configuration space")

    async def cfg_write(self, rid, offset, value, size=4):
        raise NotImplementedError("this fake transport has no configuration space")

    async def enumerate(self):
        raise NotImplementedError("this fake transport has no platform")

    async def reserve_mmio(self, size, align, prefetchable=True, bus_num=1):
        raise NotImplementedError("this fake transport has no platform")

    async def mmio_read(self, addr, size=4):
        raise NotImplementedError("this fake transport has no card")

    async def mmio_write(self, addr, value, size=4):
        raise NotImplementedError("this fake transport has no card")
