"""virtio 1.x front end for the card's functions: every function (the PF and each VF) is a
modern virtio-net device (PCI device ID 0x1041) with one receive and one transmit queue.

The pieces, bottom up:

* :class:`RegisterAccess` -- how register accesses reach the function. :class:`DirectAccess`
  is a function assigned to the driver (accesses go straight to the card);
  :class:`TrappedAccess` is a function behind a hypervisor that traps every access and forwards
  it, so each one costs an exit.
* :class:`DmaMemory` -- where rings and buffers live and which address the device is given.
  :class:`HostMemory` is host memory addressed by bus address; :class:`DomainMemory` is guest
  memory behind the card's IOMMU, addressed by IOVA.
* :class:`Virtqueue` -- a split virtqueue (virtio spec 2.7) with indirect descriptors and
  event-index notification and interrupt suppression.
* :class:`VirtioNetDriver` -- capability discovery, the initialisation sequence of spec 3.1.1,
  queue setup over the PCI common configuration (spec 4.1.4.3), and frame transmit/receive.

The MSI-X table is programmed through :class:`host_driver.offcard.OffcardFunction` rather than
:class:`RegisterAccess`: it belongs to the PCI function, which a hypervisor emulates apart
from the virtio registers. Register offsets and feature bits come from :mod:`regmap`.
"""

import struct
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

from regmap import PAGE_SHIFT, VirtioCaps, VirtioRegs as V

from .offcard import OffcardFunction

__all__ = ["VirtioError", "RegisterAccess", "DirectAccess", "TrappedAccess", "DmaMemory",
           "HostMemory", "DomainMemory", "Virtqueue", "VirtioNetDriver", "VirtioStructure",
           "vring_need_event", "FEATURE_NAMES", "DRIVER_FEATURES", "NET_HDR_LEN",
           "NET_HDR_F_NEEDS_CSUM", "NET_HDR_F_DATA_VALID",
           "RX_QUEUE", "TX_QUEUE", "CTRL_QUEUE", "CONFIG_VECTOR", "RX_VECTOR", "TX_VECTOR",
           "MQ_FEATURES", "rx_queue", "tx_queue"]

PAGE_SIZE = 1 << PAGE_SHIFT

# PCI configuration space
PCI_STATUS = 0x06
PCI_STATUS_CAP_LIST = 1 << 4
PCI_CAP_PTR = 0x34
CAP_VENDOR = 0x09
VIRTIO_CAP_LEN = 16             # struct virtio_pci_cap
VIRTIO_NOTIFY_CAP_LEN = 20      # struct virtio_pci_notify_cap

# split virtqueue (spec 2.7)
DESC_SIZE = 16
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
MAX_QUEUE_SIZE = 1 << 15

# virtio-net
NET_HDR_LEN = 12                # struct virtio_net_hdr with num_buffers (VERSION_1)
NET_HDR = struct.Struct("<BBHHHHH")   # flags, gso_type, hdr_len, gso_size, csum_start,
                                      # csum_offset, num_buffers
NET_HDR_F_NEEDS_CSUM, NET_HDR_F_DATA_VALID = 1, 2
BUF_SIZE = 2048                 # one receive buffer, one transmit slot
TX_FRAME_OFF = 64               # the frame's place in a transmit slot (the header is at 0)
MAX_FRAME = 1518
RX_QUEUE, TX_QUEUE = 0, 1      # pair 0; pair k: receiveq 2k, transmitq 2k + 1
CTRL_QUEUE = 2 * V.MAX_PAIRS    # the control queue, with MQ negotiated
CONFIG_VECTOR, RX_VECTOR, TX_VECTOR = 0, 1, 2
MQ_FEATURES = 1 << V.F_NET_CTRL_VQ | 1 << V.F_NET_MQ      # negotiated when ``pairs`` > 1


def rx_queue(pair: int) -> int:
    return 2 * pair


def tx_queue(pair: int) -> int:
    return 2 * pair + 1

FEATURE_NAMES = {
    "CSUM": V.F_NET_CSUM,
    "GUEST_CSUM": V.F_NET_GUEST_CSUM,
    "MAC": V.F_NET_MAC,
    "MRG_RXBUF": V.F_NET_MRG_RXBUF,
    "STATUS": V.F_NET_STATUS,
    "INDIRECT_DESC": V.F_RING_INDIRECT_DESC,
    "EVENT_IDX": V.F_RING_EVENT_IDX,
    "VERSION_1": V.F_VERSION_1,
}
DRIVER_FEATURES = sum(1 << bit for bit in FEATURE_NAMES.values())

_CFG_NAMES = {VirtioCaps.CFG_TYPE_COMMON: "common", VirtioCaps.CFG_TYPE_NOTIFY: "notify",
              VirtioCaps.CFG_TYPE_ISR: "ISR", VirtioCaps.CFG_TYPE_DEVICE: "device"}
# smallest usable structure: the whole common cfg, one notify register, the ISR byte, and
# virtio_net_config up to max_virtqueue_pairs
_CFG_MIN_LEN = {VirtioCaps.CFG_TYPE_COMMON: V.COMMON_LEN, VirtioCaps.CFG_TYPE_NOTIFY: 2,
                VirtioCaps.CFG_TYPE_ISR: 1, VirtioCaps.CFG_TYPE_DEVICE: V.NET_MAX_PAIRS + 2}


class VirtioError(Exception):
    """The device cannot be driven: a structure is missing, it refused the negotiation or a
    queue, or it asks to be reset."""


def vring_need_event(event: int, new: int, old: int) -> bool:
    """Whether moving a ring index from ``old`` to ``new`` passes ``event`` (spec 2.7.10):
    the event-index test of both notifications and interrupts, modulo 2**16."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


def _dw_round(n: int) -> int:
    return (n + 3) & ~3


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# ---- register access ---------------------------------------------------------------------

class RegisterAccess(Protocol):
    """Accesses to one function's registers: BAR0 offsets and its configuration space.
    ``traps`` counts the accesses that exited to a hypervisor."""
    traps: int

    async def read(self, offset: int, size: int) -> int: ...

    async def write(self, offset: int, value: int, size: int) -> None: ...

    async def cfg_read(self, offset: int, size: int) -> int: ...


class DirectAccess:
    """The function is the driver's own (host driver, or a VF passed through): every access
    goes straight to the card."""
    traps = 0

    def __init__(self, fn: OffcardFunction):
        self.fn = fn

    async def read(self, offset: int, size: int = 4) -> int:
        return await self.fn.t.mmio_read(self.fn.bar0 + offset, size)

    async def write(self, offset: int, value: int, size: int = 4) -> None:
        await self.fn.t.mmio_write(self.fn.bar0 + offset, value, size)

    async def cfg_read(self, offset: int, size: int = 4) -> int:
        return await self.fn.t.cfg_read(self.fn.rid, offset, size)


class TrappedAccess(DirectAccess):
    """The function sits behind a hypervisor that traps every register and configuration
    access and forwards it to the card: each access counts in :attr:`traps` and first costs
    ``exit_ns`` of simulated time (the exit and the emulator's round trip)."""

    def __init__(self, fn: OffcardFunction, exit_ns: int = 2_000):
        super().__init__(fn)
        self.exit_ns = exit_ns
        self.traps = 0

    async def _exit(self) -> None:
        self.traps += 1
        if self.exit_ns:
            await self.fn.t.sleep_ns(self.exit_ns)

    async def read(self, offset: int, size: int = 4) -> int:
        await self._exit()
        return await super().read(offset, size)

    async def write(self, offset: int, value: int, size: int = 4) -> None:
        await self._exit()
        await super().write(offset, value, size)

    async def cfg_read(self, offset: int, size: int = 4) -> int:
        await self._exit()
        return await super().cfg_read(offset, size)


# ---- DMA memory --------------------------------------------------------------------------

class DmaMemory(Protocol):
    """Memory the device reaches by DMA. Addresses are what the device is given."""

    async def alloc(self, size: int, align: int = 16) -> int: ...

    async def read(self, addr: int, n: int) -> bytes: ...

    async def write(self, addr: int, data: bytes) -> None: ...


class HostMemory:
    """Host memory: the device sees bus addresses, with no translation in between."""

    def __init__(self, t):
        self.t = t

    async def alloc(self, size: int, align: int = 16) -> int:
        raw = self.t.alloc_host_mem(size + align - 1)
        return (raw + align - 1) & -align

    async def read(self, addr: int, n: int) -> bytes:
        return await self.t.host_read(addr, n)

    async def write(self, addr: int, data: bytes) -> None:
        await self.t.host_write(addr, data)


class DomainMemory:
    """Guest memory behind the card's IOMMU: a bump allocator over IOVAs ``base_iova`` ..
    ``base_iova + size`` of ``domain`` (an :class:`host_driver.iommu.IommuDomain`). Pages are
    backed and mapped as allocations first reach them (pages already present are kept), and
    accesses go through the domain's translation. Memory is never freed."""

    def __init__(self, domain, base_iova: int, size: int):
        if base_iova < 0 or base_iova % PAGE_SIZE:
            raise ValueError(f"base_iova {base_iova:#x} must be page aligned")
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.domain = domain
        self.base = base_iova
        self.end = base_iova + size
        self.next = base_iova
        self.mapped = base_iova          # every page below this is present

    async def alloc(self, size: int, align: int = 16) -> int:
        addr = (self.next + align - 1) & -align
        end = addr + size
        if end > self.end:
            raise MemoryError(f"IOVA range {self.base:#x}..{self.end:#x} exhausted "
                              f"({size} bytes asked at {addr:#x})")
        top = (end + PAGE_SIZE - 1) & -PAGE_SIZE
        if top > self.mapped:
            await self._back(self.mapped, top)
            self.mapped = top
        self.next = end
        return addr

    async def _back(self, lo: int, hi: int) -> None:
        """Map the pages of ``lo`` .. ``hi`` that are not present, a run at a time."""
        iova = lo
        while iova < hi:
            run = iova
            while run < hi and self.domain.translate(run) is None:
                run += PAGE_SIZE
            if run > iova:
                await self.domain.map(iova, run - iova)
                iova = run
            else:
                iova += PAGE_SIZE

    async def read(self, addr: int, n: int) -> bytes:
        return await self.domain.read(addr, n)

    async def write(self, addr: int, data: bytes) -> None:
        await self.domain.write(addr, data)


# ---- split virtqueue ---------------------------------------------------------------------

class Virtqueue:
    """A split virtqueue (spec 2.7) of ``size`` entries in ``mem``: the descriptor table,
    the available ring (driver area: flags, idx, ring[size], used_event) and the used ring
    (device area: flags, idx, ring[size] of {id, len}, avail_event).

    Buffers are lists of (device address, length). The driver side keeps each chain's
    descriptors, so a used entry that names a descriptor not in flight is caught rather than
    followed. An indirect buffer uses a table of up to ``max_indirect`` descriptors owned by
    its head descriptor; the tables are allocated on first use and reused.

    :meth:`init` allocates the rings on its first call; calling it again (after a device
    reset) clears them and starts over from index 0.
    """

    def __init__(self, mem: DmaMemory, index: int, size: int, max_indirect: int = 8):
        if not _pow2(size) or size > MAX_QUEUE_SIZE:
            raise ValueError(f"queue size must be a power of two up to {MAX_QUEUE_SIZE}, "
                             f"got {size}")
        self.mem = mem
        self.index = index
        self.size = size
        self.max_indirect = max_indirect
        self.desc: int | None = None
        self.avail: int | None = None
        self.used: int | None = None
        self.event_idx = False
        self.interrupts = True
        self._indirect: int | None = None
        self._free: deque[int] = deque()
        self._chains: dict[int, list[int]] = {}
        self._avail_idx = 0
        self._kicked = 0
        self._last_used = 0

    def __repr__(self):
        return (f"Virtqueue(index={self.index}, size={self.size}, free={self.num_free}, "
                f"avail_idx={self._avail_idx}, last_used={self._last_used})")

    async def init(self, event_idx: bool = False) -> None:
        """Allocate (first call) and zero the rings; every descriptor free, indices at 0.
        ``event_idx``: VIRTIO_F_EVENT_IDX was negotiated."""
        if self.desc is None:
            self.desc = await self.mem.alloc(DESC_SIZE * self.size, 16)
            # rounded up to whole DWs, as Linux's contiguous vring layout gives them: the device
            # reads the trailing u16 (used_event / avail_event) as part of a DW
            self.avail = await self.mem.alloc(_dw_round(6 + 2 * self.size), 4)
            self.used = await self.mem.alloc(_dw_round(6 + 8 * self.size), 4)
        await self.mem.write(self.desc, bytes(DESC_SIZE * self.size))
        await self.mem.write(self.avail, bytes(6 + 2 * self.size))
        await self.mem.write(self.used, bytes(6 + 8 * self.size))
        self.event_idx = event_idx
        self.interrupts = True
        self._free = deque(range(self.size))
        self._chains = {}
        self._avail_idx = self._kicked = self._last_used = 0

    @property
    def avail_idx(self) -> int:
        """The driver's available index (what it last published)."""
        return self._avail_idx

    @property
    def num_free(self) -> int:
        """Descriptors not in flight."""
        return len(self._free)

    @property
    def in_flight(self) -> int:
        """Buffers made available and not yet used."""
        return len(self._chains)

    async def _read16(self, addr: int) -> int:
        return int.from_bytes(await self.mem.read(addr, 2), "little")

    async def _write16(self, addr: int, value: int) -> None:
        await self.mem.write(addr, (value & 0xFFFF).to_bytes(2, "little"))

    async def add_buffer(self, out_bufs: Sequence[tuple[int, int]] = (),
                         in_bufs: Sequence[tuple[int, int]] = (), indirect: bool = False) -> int:
        """Make a buffer available: the device-readable parts ``out_bufs`` followed by the
        device-writable parts ``in_bufs``, chained in the descriptor table, or with
        ``indirect`` in an indirect table that one INDIRECT descriptor points to. Publishes the
        available index; returns the head descriptor's id. Raises :class:`VirtioError` when
        too few descriptors are free."""
        parts = [(a, n, 0) for a, n in out_bufs] + [(a, n, DESC_F_WRITE) for a, n in in_bufs]
        if not parts:
            raise ValueError("a buffer needs at least one part")
        if indirect and len(parts) > self.max_indirect:
            raise ValueError(f"{len(parts)} parts do not fit an indirect table of "
                             f"{self.max_indirect}")
        need = 1 if indirect else len(parts)
        if need > len(self._free):
            raise VirtioError(f"queue {self.index}: {need} descriptors needed, "
                              f"{len(self._free)} free")
        ids = [self._free.popleft() for _ in range(need)]
        head = ids[0]
        if indirect:
            table = await self._indirect_table(head)
            await self.mem.write(table, _pack_chain(parts, range(1, len(parts))))
            await self.mem.write(self.desc + DESC_SIZE * head,
                                 _pack_desc(table, DESC_SIZE * len(parts), DESC_F_INDIRECT, 0))
        else:
            for k, part in enumerate(parts):
                nxt = ids[k + 1:k + 2]
                await self.mem.write(self.desc + DESC_SIZE * ids[k], _pack_chain([part], nxt))
        self._chains[head] = ids
        await self._write16(self.avail + 4 + 2 * (self._avail_idx % self.size), head)
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        await self._write16(self.avail + 2, self._avail_idx)
        return head

    async def _indirect_table(self, head: int) -> int:
        stride = DESC_SIZE * self.max_indirect
        if self._indirect is None:
            self._indirect = await self.mem.alloc(stride * self.size, 16)
        return self._indirect + stride * head

    async def kick_needed(self) -> bool:
        """Whether the buffers published since the last call need a notification: with
        EVENT_IDX when the available index passed the device's avail_event, otherwise unless
        the device set NO_NOTIFY in the used ring's flags. The caller notifies on True."""
        old, new = self._kicked, self._avail_idx
        self._kicked = new
        if old == new:
            return False
        if self.event_idx:
            event = await self._read16(self.used + 4 + 8 * self.size)
            return vring_need_event(event, new, old)
        return not await self._read16(self.used) & USED_F_NO_NOTIFY

    async def has_used(self) -> bool:
        """Whether the device has used buffers that :meth:`get_used` has not returned yet."""
        return await self._read16(self.used + 2) != self._last_used

    async def get_used(self) -> list[tuple[int, int]]:
        """The (head id, bytes written) of the buffers used since the last call, oldest first;
        their descriptors are free again. With EVENT_IDX and interrupts on, used_event then
        asks for an interrupt on the next used buffer."""
        idx = await self._read16(self.used + 2)
        pending = (idx - self._last_used) & 0xFFFF
        if pending > self.size:
            raise VirtioError(f"queue {self.index}: used index {idx} is {pending} ahead of "
                              f"{self._last_used}, more than the {self.size} entries")
        done = []
        for _ in range(pending):
            slot = self.used + 4 + 8 * (self._last_used % self.size)
            head, length = struct.unpack("<II", await self.mem.read(slot, 8))
            ids = self._chains.pop(head, None)
            if ids is None:
                raise VirtioError(f"queue {self.index}: device used descriptor {head}, which "
                                  f"is not in flight")
            self._free.extend(ids)
            done.append((head, length))
            self._last_used = (self._last_used + 1) & 0xFFFF
        if done and self.event_idx and self.interrupts:
            await self.set_used_event(self._last_used)
        return done

    async def set_used_event(self, idx: int) -> None:
        """Ask for an interrupt when the used index passes ``idx`` (EVENT_IDX only)."""
        await self._write16(self.avail + 4 + 2 * self.size, idx)

    async def disable_interrupts(self) -> None:
        """Suppress used-buffer interrupts: NO_INTERRUPT in the available ring's flags, or with
        EVENT_IDX (where the flags must stay 0) used_event just behind the driver, which the
        device passes again only after 2**16 more buffers. A hint: the device may still
        interrupt, and the driver polls."""
        self.interrupts = False
        if self.event_idx:
            await self.set_used_event(self._last_used - 1)
        else:
            await self._write16(self.avail, AVAIL_F_NO_INTERRUPT)

    async def enable_interrupts(self) -> bool:
        """Ask for interrupts again; returns whether buffers were used meanwhile (they raised
        no interrupt, so the caller should collect them now)."""
        self.interrupts = True
        if self.event_idx:
            await self.set_used_event(self._last_used)
        else:
            await self._write16(self.avail, 0)
        return await self.has_used()


def _pack_desc(addr: int, length: int, flags: int, nxt: int) -> bytes:
    return struct.pack("<QIHH", addr, length, flags, nxt)


def _pack_chain(parts, nexts: Iterable[int]) -> bytes:
    """Descriptors for ``parts`` (address, length, flags), each but the last chained (NEXT)
    to the matching id of ``nexts``."""
    nexts = list(nexts)
    out = b""
    for k, (addr, length, flags) in enumerate(parts):
        if k < len(nexts):
            out += _pack_desc(addr, length, flags | DESC_F_NEXT, nexts[k])
        else:
            out += _pack_desc(addr, length, flags, 0)
    return out


# ---- virtio-net driver -------------------------------------------------------------------

@dataclass
class VirtioStructure:
    """One virtio structure found through a vendor capability: ``cap`` is the capability's
    configuration offset, ``offset`` and ``length`` place the structure in BAR0, and
    ``notify_mult`` is the notify capability's notify_off_multiplier (None otherwise)."""
    cfg_type: int
    cap: int
    offset: int
    length: int
    notify_mult: int | None = None


class VirtioNetDriver:
    """A virtio-net driver for one card function: registers through ``access``, rings and
    buffers in ``mem``, MSI-X vectors and time through ``fn``.

    Queue 0 is receiveq1 and queue 1 transmitq1 (and more pairs with ``pairs``), each of
    ``queue_size`` entries (fewer if the
    device offers fewer). MSI-X vector 0 takes configuration changes, 1 the receive queue and
    2 the transmit queue; transmit interrupts are suppressed, :meth:`send` and :meth:`reap_tx`
    collect finished frames. Every buffer is a ``BUF_SIZE`` slot: a receive buffer holds the
    virtio-net header and the frame, a transmit slot the header and, at ``TX_FRAME_OFF``, the
    frame. ``rx_buf_size`` (default ``BUF_SIZE``) is the length the receive buffers are posted
    with; with MRG_RXBUF negotiated a frame may span several, as the header's num_buffers
    says (a buffer used with length 0 carried nothing: the device dropped that frame).
    ``poll_ns`` paces every wait; ``tx_timeout_ns`` bounds a wait for transmit room.

    ``pairs`` > 1: VIRTIO_NET_F_MQ and CTRL_VQ are negotiated, queues 2k / 2k + 1 of each pair
    k < ``pairs`` and the control queue (:data:`CTRL_QUEUE`, polled: no vector) are set up,
    and VQ_PAIRS_SET enables the pairs after DRIVER_OK. Receive queues share the receive
    vector, transmit queues the transmit one; :meth:`send` takes the pair to send on,
    :meth:`receive` collects every receive queue and counts frames per queue in
    ``rx_per_queue``.
    """

    def __init__(self, access: RegisterAccess, fn: OffcardFunction, mem: DmaMemory,
                 queue_size: int = 64, poll_ns: int = 1_000, tx_timeout_ns: int = 1_000_000,
                 rx_buf_size: int = BUF_SIZE, pairs: int = 1):
        if not _pow2(queue_size) or queue_size > MAX_QUEUE_SIZE:
            raise ValueError(f"queue_size must be a power of two up to {MAX_QUEUE_SIZE}, "
                             f"got {queue_size}")
        if not NET_HDR_LEN <= rx_buf_size <= BUF_SIZE:
            raise ValueError(f"rx_buf_size must be {NET_HDR_LEN}..{BUF_SIZE}, got {rx_buf_size}")
        if not 1 <= pairs <= V.MAX_PAIRS:
            raise ValueError(f"pairs must be 1..{V.MAX_PAIRS}, got {pairs}")
        self.rx_buf_size = rx_buf_size
        self.pairs = pairs
        # per receive queue: the buffers of a merged frame so far, how many it has, its flags
        self._partial: dict[int, list[bytes]] = {}
        self._partial_want: dict[int, int] = {}
        self._partial_flags: dict[int, int] = {}
        #: frames received per receive queue
        self.rx_per_queue: dict[int, int] = {}
        #: the virtio_net_hdr flags of each frame received, in order (DATA_VALID = 2)
        self.rx_flags: list[int] = []
        self.access = access
        self.fn = fn
        self.t = fn.t
        self.mem = mem
        self.queue_size = queue_size
        self.poll_ns = poll_ns
        self.tx_timeout_ns = tx_timeout_ns
        self.structures: dict[int, VirtioStructure] = {}
        self.features = 0
        self.mac: bytes | None = None
        self.queues: dict[int, Virtqueue] = {}
        self.stats = {"sent": 0, "received": 0, "notifies": 0, "interrupts": 0,
                      "rx_empty": 0, "merged": 0}
        self._up = False
        self._notify_reg: dict[int, int] = {}
        self._slots: dict[int, list[int]] = {}        # queue -> every buffer slot
        self._pool: dict[int, list[int]] = {}         # queue -> slots the device does not own
        self._owner: dict[int, dict[int, int]] = {}   # queue -> head id -> slot
        self._msi_seen: dict[int, int] = {}           # MSI-X vector -> messages accounted

    def __repr__(self):
        return f"<VirtioNetDriver {self.fn}>"

    def _data_queues(self) -> list[int]:
        return [q for k in range(self.pairs) for q in (rx_queue(k), tx_queue(k))]

    def _rx_queues(self) -> list[int]:
        return [rx_queue(k) for k in range(self.pairs)]

    @property
    def rx(self) -> Virtqueue:
        return self.queues[RX_QUEUE]

    @property
    def tx(self) -> Virtqueue:
        return self.queues[TX_QUEUE]

    @property
    def notifies(self) -> int:
        return self.stats["notifies"]

    def has_feature(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    # ---- discovery ----
    async def probe(self) -> dict[int, VirtioStructure]:
        """Walk the capability list for the virtio structures: the first usable vendor
        capability of each cfg_type (in BAR0, long enough) wins, as the spec asks."""
        rd = self.access.cfg_read
        if not await rd(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST:
            raise VirtioError(f"{self.fn}: no capability list")
        found: dict[int, VirtioStructure] = {}
        ptr = await rd(PCI_CAP_PTR, 1) & 0xFC
        seen = set()
        while ptr and ptr not in seen:
            seen.add(ptr)
            hdr = await rd(ptr, 4)
            cap_id, nxt, cap_len, cfg_type = (hdr >> s & 0xFF for s in (0, 8, 16, 24))
            min_cap = (VIRTIO_NOTIFY_CAP_LEN if cfg_type == VirtioCaps.CFG_TYPE_NOTIFY
                       else VIRTIO_CAP_LEN)
            if (cap_id == CAP_VENDOR and cfg_type in _CFG_NAMES and cfg_type not in found
                    and cap_len >= min_cap and await rd(ptr + 4, 1) == 0):
                s = VirtioStructure(cfg_type, ptr, await rd(ptr + 8, 4), await rd(ptr + 12, 4))
                if cfg_type == VirtioCaps.CFG_TYPE_NOTIFY:
                    s.notify_mult = await rd(ptr + 16, 4)
                if s.length >= _CFG_MIN_LEN[cfg_type]:
                    found[cfg_type] = s
            ptr = nxt & 0xFC
        for cfg_type, name in _CFG_NAMES.items():
            if cfg_type not in found:
                raise VirtioError(f"{self.fn}: no usable virtio {name} capability")
        self.structures = found
        return found

    # ---- register helpers ----
    def _at(self, cfg_type: int, field: int) -> int:
        return self.structures[cfg_type].offset + field

    async def _cread(self, field: int, size: int) -> int:
        return await self.access.read(self._at(VirtioCaps.CFG_TYPE_COMMON, field), size)

    async def _cwrite(self, field: int, value: int, size: int) -> None:
        await self.access.write(self._at(VirtioCaps.CFG_TYPE_COMMON, field), value, size)

    async def _dread(self, field: int, size: int) -> int:
        return await self.access.read(self._at(VirtioCaps.CFG_TYPE_DEVICE, field), size)

    async def read_status(self) -> int:
        return await self._cread(V.STATUS, 1)

    async def _set_status(self, status: int) -> None:
        await self._cwrite(V.STATUS, status, 1)

    async def read_isr(self) -> int:
        """The ISR status byte (bit 0 queue, bit 1 configuration change); reading clears it."""
        return await self.access.read(self._at(VirtioCaps.CFG_TYPE_ISR, 0), 1)

    async def check_status(self) -> int:
        """The device status; raises :class:`VirtioError` if the device set NEEDS_RESET."""
        status = await self.read_status()
        if status & V.S_NEEDS_RESET:
            raise VirtioError(f"{self.fn}: device set NEEDS_RESET (status {status:#04x})")
        return status

    async def device_features(self) -> int:
        lo_hi = []
        for sel in (0, 1):
            await self._cwrite(V.DFSELECT, sel, 4)
            lo_hi.append(await self._cread(V.DF, 4))
        return lo_hi[0] | lo_hi[1] << 32

    async def _write_driver_features(self, features: int) -> None:
        for sel in (0, 1):
            await self._cwrite(V.GFSELECT, sel, 4)
            await self._cwrite(V.GF, features >> 32 * sel & 0xFFFF_FFFF, 4)

    # ---- initialisation ----
    async def reset(self, timeout_ns: int = 1_000_000) -> None:
        """Reset the device (status 0) and wait until it reads back 0; the driver forgets its
        queues' contents (the rings stay allocated for the next :meth:`bring_up`)."""
        if not self.structures:
            await self.probe()
        await self._set_status(0)
        waited = 0
        while await self.read_status() != 0:
            if waited >= timeout_ns:
                raise VirtioError(f"{self.fn}: device still not reset after {timeout_ns} ns")
            await self.t.sleep_ns(self.poll_ns)
            waited += self.poll_ns
        self._up = False
        self.features = 0
        for q, slots in self._slots.items():
            self._pool[q] = list(slots)
            self._owner[q] = {}
        self._partial.clear()

    async def bring_up(self, features: int | None = None, skip_features_ok: bool = False,
                       refuse: Iterable[str] = ()) -> int:
        """Initialise the device as spec 3.1.1 orders it: reset, ACKNOWLEDGE, DRIVER, feature
        negotiation, FEATURES_OK (checked), queue and MSI-X setup, DRIVER_OK.

        ``features`` are written as given (default: what the device offers and the driver
        supports), less the :data:`FEATURE_NAMES` in ``refuse``. ``skip_features_ok`` leaves
        FEATURES_OK out (the rest runs as usual), which the device must not accept as live.
        If a step fails the driver sets FAILED and raises :class:`VirtioError`. Returns the
        features written."""
        unknown = set(refuse) - FEATURE_NAMES.keys()
        if unknown:
            raise ValueError(f"unknown feature names {sorted(unknown)}")
        await self.reset()
        status = V.S_ACKNOWLEDGE
        await self._set_status(status)
        status |= V.S_DRIVER
        await self._set_status(status)
        try:
            offered = await self.device_features()
            mine = DRIVER_FEATURES | (MQ_FEATURES if self.pairs > 1 else 0)
            want = offered & mine if features is None else features
            if self.pairs > 1 and want & MQ_FEATURES != MQ_FEATURES:
                raise VirtioError(f"{self.fn}: {self.pairs} queue pairs asked, the device "
                                  f"offers no multiqueue (features {offered:#x})")
            for name in refuse:
                want &= ~(1 << FEATURE_NAMES[name])
            await self._write_driver_features(want)
            if not skip_features_ok:
                status |= V.S_FEATURES_OK
                await self._set_status(status)
                if not await self.read_status() & V.S_FEATURES_OK:
                    raise VirtioError(f"{self.fn}: device refused features {want:#x} "
                                      f"(FEATURES_OK did not stick)")
            self.features = want
            await self._setup_msix()
            if self.pairs > 1:
                most = await self._dread(V.NET_MAX_PAIRS, 2)
                if self.pairs > most:
                    raise VirtioError(f"{self.fn}: {self.pairs} queue pairs asked, the device "
                                      f"has {most}")
            for q in self._data_queues():
                await self._setup_queue(q)
                if q % 2:
                    await self.queues[q].disable_interrupts()
            if self.has_feature(V.F_NET_CTRL_VQ):
                await self._setup_queue(CTRL_QUEUE if self.has_feature(V.F_NET_MQ) else 2)
            self.mac = await self._read_mac() if self.has_feature(V.F_NET_MAC) else None
            status |= V.S_DRIVER_OK
            await self._set_status(status)
            await self.check_status()
            if self.pairs > 1:
                await self.set_pairs(self.pairs)
        except VirtioError:
            await self._set_status(await self.read_status() | V.S_FAILED)
            raise
        self._up = True
        return want

    # ---- rings the caller owns (vhost / vDPA: the guest's own rings) ----
    async def negotiate(self, features: int) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, write ``features`` (less what the device does not
        offer), FEATURES_OK (checked) and the configuration-change vector: the first half of
        :meth:`bring_up` for a caller that hands the device rings of its own with
        :meth:`attach_ring`, then calls :meth:`driver_ok`. Returns the features written."""
        await self.reset()
        status = V.S_ACKNOWLEDGE | V.S_DRIVER
        await self._set_status(V.S_ACKNOWLEDGE)
        await self._set_status(status)
        want = features & await self.device_features()
        try:
            await self._write_driver_features(want)
            await self._set_status(status | V.S_FEATURES_OK)
            if not await self.read_status() & V.S_FEATURES_OK:
                raise VirtioError(f"{self.fn}: device refused features {want:#x}")
            self.features = want
            await self._setup_msix()
        except VirtioError:
            await self._set_status(await self.read_status() | V.S_FAILED)
            raise
        return want

    async def attach_ring(self, q: int, size: int, desc: int, avail: int, used: int) -> None:
        """Queue ``q`` on rings the caller laid out (device addresses of the descriptor table,
        available and used rings), ``size`` entries, its MSI-X vector (:meth:`vector_of`)."""
        await self._cwrite(V.Q_SELECT, q, 2)
        max_size = await self._cread(V.Q_SIZE, 2)
        if not _pow2(size) or not 0 < size <= max_size:
            raise VirtioError(f"{self.fn}: queue {q}: size {size} (the device takes up to "
                              f"{max_size}, a power of two)")
        await self._program_queue(q, size, desc, avail, used)

    async def driver_ok(self) -> None:
        """DRIVER_OK after :meth:`negotiate` and :meth:`attach_ring`; checks the status."""
        await self._set_status(await self.read_status() | V.S_DRIVER_OK)
        await self.check_status()

    def _queue_vector(self, q: int):
        """Queue ``q``'s MSI-X vector number: receive queues share RX_VECTOR, transmit queues
        TX_VECTOR; the control queue has none (its answers are polled)."""
        if self.has_feature(V.F_NET_CTRL_VQ) and q == self._ctrl_q():
            return None
        return self._data_vector(q)

    @staticmethod
    def _data_vector(q: int) -> int:
        return TX_VECTOR if q % 2 else RX_VECTOR

    def _ctrl_q(self) -> int:
        return CTRL_QUEUE if self.has_feature(V.F_NET_MQ) else 2

    def vector_of(self, q: int):
        """The MSI-X vector (a :class:`host_driver.transport.MsiVector`) of queue ``q``."""
        return self.fn.msix_vectors[self._data_vector(q)]

    def rehome(self, fn: OffcardFunction, access: RegisterAccess | None = None) -> None:
        """Go on, with the same queues and buffers, on function ``fn``: a live migration moved
        the device state there (and the memory to ``fn``'s host), and that host set up ``fn``'s
        MSI-X vectors. Registers now go through ``access`` (default: direct)."""
        self.fn, self.t = fn, fn.t
        self.access = access or DirectAccess(fn)
        self._msi_seen = {v: self.t.msi_count(fn.msix_vectors[v]) for v in self._msi_seen}

    async def _setup_msix(self) -> None:
        """MSI-X on the function (if not yet) and the configuration-change vector."""
        if not self.fn.msix_vectors:
            await self.fn.setup_msix()
        await self._cwrite(V.MSIX_CONFIG, CONFIG_VECTOR, 2)
        if await self._cread(V.MSIX_CONFIG, 2) == V.NO_VECTOR:
            raise VirtioError(f"{self.fn}: device refused MSI-X vector {CONFIG_VECTOR} for "
                              f"configuration changes")
        await self._use_vector(CONFIG_VECTOR)

    async def _use_vector(self, vector: int) -> None:
        await self.fn.msix_mask(vector, False)
        self._msi_seen[vector] = self.t.msi_count(self.fn.msix_vectors[vector])

    async def _setup_queue(self, q: int) -> None:
        await self._cwrite(V.Q_SELECT, q, 2)
        max_size = await self._cread(V.Q_SIZE, 2)
        if max_size == 0:
            raise VirtioError(f"{self.fn}: queue {q} is not available")
        size = min(self.queue_size, 1 << max_size.bit_length() - 1)
        vq = self.queues.get(q)
        if vq is None or vq.size != size:
            vq = self.queues[q] = Virtqueue(self.mem, q, size)
        await vq.init(event_idx=self.has_feature(V.F_RING_EVENT_IDX))
        if q not in self._slots:
            base = await self.mem.alloc(BUF_SIZE * self.queue_size, 64)
            self._slots[q] = [base + BUF_SIZE * k for k in range(self.queue_size)]
        self._pool[q] = list(self._slots[q])
        self._owner[q] = {}
        await self._program_queue(q, size, vq.desc, vq.avail, vq.used)

    async def _program_queue(self, q: int, size: int, desc: int, avail: int, used: int) -> None:
        """The selected queue ``q``: size, MSI-X vector (checked; none for the control queue), its
        notify register, the three ring addresses, enable."""
        await self._cwrite(V.Q_SIZE, size, 2)
        vector = self._queue_vector(q)
        await self._cwrite(V.Q_MSIX, V.NO_VECTOR if vector is None else vector, 2)
        if vector is not None:
            if await self._cread(V.Q_MSIX, 2) == V.NO_VECTOR:
                raise VirtioError(f"{self.fn}: queue {q}: device refused MSI-X vector {vector}")
            await self._use_vector(vector)
        notify = self.structures[VirtioCaps.CFG_TYPE_NOTIFY]
        off = await self._cread(V.Q_NOTIFY_OFF, 2) * notify.notify_mult
        if off + 2 > notify.length:
            raise VirtioError(f"{self.fn}: queue {q}: notify offset {off:#x} outside the "
                              f"{notify.length:#x}-byte notify structure")
        self._notify_reg[q] = notify.offset + off
        for field, addr in ((V.Q_DESC, desc), (V.Q_DRIVER, avail), (V.Q_DEVICE, used)):
            await self._cwrite(field, addr & 0xFFFF_FFFF, 4)
            await self._cwrite(field + 4, addr >> 32, 4)
        await self._cwrite(V.Q_ENABLE, 1, 2)

    async def _read_mac(self) -> bytes:
        """The MAC from the device configuration, re-read until config_generation holds."""
        for _ in range(8):
            gen = await self._cread(V.CFG_GENERATION, 1)
            mac = bytes([await self._dread(V.NET_MAC + k, 1) for k in range(6)])
            if await self._cread(V.CFG_GENERATION, 1) == gen:
                return mac
        raise VirtioError(f"{self.fn}: device configuration keeps changing")

    async def link_up(self) -> bool:
        """The link state from the device configuration (up if STATUS was not negotiated)."""
        if not self.has_feature(V.F_NET_STATUS):
            return True
        return bool(await self._dread(V.NET_STATUS, 2) & 1)

    # ---- data path ----
    def _need_queues(self) -> None:
        if not self._up:
            raise VirtioError(f"{self.fn}: the device is not brought up")

    # ---- the control queue ----
    async def command(self, cls: int, cmd: int, data: bytes = b"",
                      timeout_ns: int = 200_000) -> int:
        """Send a control command (class, command, data) and wait for the device's ack byte
        (:data:`regmap.VirtioRegs` CTRL_OK / CTRL_ERR), which it returns. The command, its
        data and the ack are three buffers of one chain, as Linux sends them."""
        if not self.has_feature(V.F_NET_CTRL_VQ):
            raise VirtioError(f"{self.fn}: CTRL_VQ was not negotiated")
        q = self._ctrl_q()
        vq = self.queues[q]
        slot = self._pool[q].pop()
        await self.mem.write(slot, bytes([cls, cmd]))
        await self.mem.write(slot + 16, data)
        await self.mem.write(slot + 64, b"\xff")
        out = [(slot, 2)] + ([(slot + 16, len(data))] if data else [])
        head = await vq.add_buffer(out, [(slot + 64, 1)])
        await self.notify(q)
        waited = 0
        while True:
            done = await vq.get_used()
            if done:
                break
            if waited >= timeout_ns:
                await self.check_status()
                raise VirtioError(f"{self.fn}: control command {cls}/{cmd} not answered in "
                                  f"{timeout_ns} ns")
            await self.t.sleep_ns(self.poll_ns)
            waited += self.poll_ns
        assert done == [(head, 1)], done
        self._pool[q].append(slot)
        return (await self.mem.read(slot + 64, 1))[0]

    async def set_pairs(self, n: int) -> None:
        """VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: use ``n`` queue pairs (raises if refused)."""
        ack = await self.command(V.CTRL_MQ, V.CTRL_MQ_VQ_PAIRS_SET, n.to_bytes(2, "little"))
        if ack != V.CTRL_OK:
            raise VirtioError(f"{self.fn}: the device refused {n} queue pairs (ack {ack})")

    async def notify(self, q: int) -> None:
        """Ring queue ``q``'s doorbell (whether the device asked for it or not)."""
        await self.access.write(self._notify_reg[q], q, 2)
        self.stats["notifies"] += 1

    async def _kick(self, q: int) -> None:
        if await self.queues[q].kick_needed():
            await self.notify(q)

    async def send(self, frame: bytes, indirect: bool = False,
                   csum: tuple[int, int] | None = None, pushed: bool = False,
                   pair: int = 0) -> int:
        """Queue ``frame`` for transmission behind a virtio-net header, in two device-readable
        descriptors or (``indirect``) one indirect descriptor, or (``pushed``) with the header
        pushed in front of the frame in one descriptor, as Linux's virtio_net does when the
        packet has the headroom (any layout is the device's to take, VIRTIO_F_VERSION_1), and
        notify the device if it asks for it. The header is all zero, or with
        ``csum = (csum_start, csum_offset)`` asks the device to fill in the checksum
        (``NEEDS_CSUM``; the frame carries the pseudo-header sum there). Waits up to
        ``tx_timeout_ns`` for room. ``pair``: the queue pair to send on. Returns the head id."""
        self._need_queues()
        if not 0 <= pair < self.pairs:
            raise ValueError(f"pair must be 0..{self.pairs - 1}, got {pair}")
        q = tx_queue(pair)
        if not 0 < len(frame) <= MAX_FRAME:
            raise ValueError(f"frame length must be 1..{MAX_FRAME}, got {len(frame)}")
        if indirect and not self.has_feature(V.F_RING_INDIRECT_DESC):
            raise VirtioError(f"{self.fn}: INDIRECT_DESC was not negotiated")
        await self._wait_tx_room(1 if indirect or pushed else 2, q)
        slot = self._pool[q].pop()
        hdr = bytes(NET_HDR_LEN)
        if csum is not None:
            hdr = NET_HDR.pack(NET_HDR_F_NEEDS_CSUM, 0, 0, 0, *csum, 0)
        if pushed:
            at = slot + TX_FRAME_OFF - NET_HDR_LEN
            await self.mem.write(at, hdr + frame)
            parts = [(at, NET_HDR_LEN + len(frame))]
        else:
            await self.mem.write(slot, hdr)
            await self.mem.write(slot + TX_FRAME_OFF, frame)
            parts = [(slot, NET_HDR_LEN), (slot + TX_FRAME_OFF, len(frame))]
        head = await self.queues[q].add_buffer(parts, indirect=indirect)
        self._owner[q][head] = slot
        self.stats["sent"] += 1
        await self._kick(q)
        return head

    async def _wait_tx_room(self, need: int, q: int = TX_QUEUE) -> None:
        waited = 0
        while self.queues[q].num_free < need:
            await self.reap_tx()
            if self.queues[q].num_free >= need:
                return
            if waited >= self.tx_timeout_ns:
                await self.check_status()
                raise VirtioError(f"{self.fn}: transmit queue still full after "
                                  f"{self.tx_timeout_ns} ns")
            await self.t.sleep_ns(self.poll_ns)
            waited += self.poll_ns

    async def reap_tx(self) -> int:
        """Take back the transmit slots of frames the device has sent; returns how many."""
        self._need_queues()
        n = 0
        for k in range(self.pairs):
            q = tx_queue(k)
            done = await self.queues[q].get_used()
            for head, _ in done:
                self._pool[q].append(self._owner[q].pop(head))
            n += len(done)
        return n

    async def _post_slot(self, slot: int, q: int = RX_QUEUE) -> None:
        head = await self.queues[q].add_buffer(in_bufs=[(slot, self.rx_buf_size)])
        self._owner[q][head] = slot

    async def post_rx(self, n: int) -> None:
        """Give the device ``n`` more receive buffers (on each receive queue)."""
        self._need_queues()
        for q in self._rx_queues():
            room = min(len(self._pool[q]), self.queues[q].num_free)
            if not 0 <= n <= room:
                raise VirtioError(f"{self.fn}: receive queue {q} has room for {room} buffers, "
                                  f"{n} asked")
            for _ in range(n):
                await self._post_slot(self._pool[q].pop(), q)
            await self._kick(q)

    async def _harvest_rx(self) -> list[bytes]:
        frames = []
        for q in self._rx_queues():
            frames += await self._harvest_queue(q)
        return frames

    async def _harvest_queue(self, q: int) -> list[bytes]:
        frames = []
        used = await self.queues[q].get_used()
        mrg = self.has_feature(V.F_NET_MRG_RXBUF)
        part = self._partial.setdefault(q, [])
        for head, length in used:
            slot = self._owner[q].pop(head)
            if length == 0 and not part:
                self.stats["rx_empty"] += 1            # a frame the device dropped
                await self._post_slot(slot, q)
                continue
            low = 0 if part else NET_HDR_LEN
            if not low <= length <= self.rx_buf_size:
                raise VirtioError(f"{self.fn}: receive buffer {head} used with length {length}")
            data = await self.mem.read(slot, length)
            await self._post_slot(slot, q)
            if not part:
                nbuf = int.from_bytes(data[10:12], "little")
                if nbuf != 1 and not (mrg and nbuf > 1):
                    raise VirtioError(f"{self.fn}: receive buffer {head}: num_buffers {nbuf}")
                self._partial_want[q] = nbuf
                self._partial_flags[q] = data[0]
                data = data[NET_HDR_LEN:]
            part.append(data)
            if len(part) == self._partial_want[q]:
                frames.append(b"".join(part))
                self.rx_flags.append(self._partial_flags[q])
                self.rx_per_queue[q] = self.rx_per_queue.get(q, 0) + 1
                if self._partial_want[q] > 1:
                    self.stats["merged"] += 1
                part.clear()
        if used:
            self.stats["received"] += len(used)
            await self._kick(q)
        return frames

    async def _note_interrupts(self) -> None:
        """Account MSI-X messages that arrived; a configuration change gets the status checked."""
        for vector, seen in self._msi_seen.items():
            count = self.t.msi_count(self.fn.msix_vectors[vector])
            self._msi_seen[vector] = count
            if count == seen:
                continue
            if vector == CONFIG_VECTOR:
                await self.check_status()
            else:
                self.stats["interrupts"] += count - seen

    async def receive(self, timeout_ns: int = 100_000) -> list[bytes]:
        """The frames received so far (header stripped), oldest first, waiting up to
        ``timeout_ns`` for the first. Waits on the receive vector in ``poll_ns`` steps and
        polls the used ring after each, so suppressed or lost interrupts only cost latency.
        The buffers go straight back to the device. On timeout returns an empty list, after
        checking the device did not set NEEDS_RESET."""
        self._need_queues()
        vector = self.fn.msix_vectors[RX_VECTOR]
        deadline = self.t.now_ns() + timeout_ns
        while True:
            await self._note_interrupts()
            frames = await self._harvest_rx()
            if frames:
                return frames
            left = deadline - self.t.now_ns()
            if left <= 0:
                await self.check_status()
                return []
            await self.t.wait_msi(vector, self._msi_seen[RX_VECTOR] + 1,
                                  max(1, int(min(left, self.poll_ns))))
