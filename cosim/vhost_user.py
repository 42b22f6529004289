"""vhost-user back-end: the device side of QEMU's ``-netdev vhost-user``, standard library only.

Written from QEMU's ``docs/interop/vhost-user.rst``. QEMU (the *front-end*) connects to a unix
socket we listen on, tells us its guest memory (``SET_MEM_TABLE``: regions and one memfd per
region) and the place and size of every virtqueue (``SET_VRING_*``), and hands us eventfds: a
*kick* per ring (the guest added buffers) and a *call* per ring (we used buffers; QEMU injects
the interrupt). The device behind us reads and writes the rings in guest memory directly.

Pieces, from the bottom up:

* the codec: :class:`MessageReader` frames a byte stream (and the fds that came with it) into
  :class:`Message` objects and rejects bad headers (unknown request, size wrong for the
  request, bad version); :func:`encode` builds a message; :class:`VringState`,
  :class:`VringAddr`, :class:`MemRegionDesc` pack and unpack the payloads;
* :class:`GuestMemory`: the mmapped regions of one memory table, translation of QEMU user
  addresses to guest-physical addresses (GPAs) and of GPA ranges to memoryviews;
* :class:`Vring`: what we know of one virtqueue, and :meth:`Vring.call` to signal used buffers;
* :class:`VhostUserDevice`: the callbacks a device implements (subclass it), and
  :class:`Deferred` for a ring stop the device answers later;
* :class:`Session`: the protocol state of one connection, sans-IO (messages in, replies out);
* :class:`VhostUserServer`: the listening socket, one front-end at a time, non-blocking;
* :class:`Reactor`: a small ``selectors`` loop the server can be attached to.

Event-loop contract: nothing here blocks. The server exposes the file descriptors it waits on
(:meth:`VhostUserServer.fds`: listening socket, connection, kick eventfds) and
:meth:`VhostUserServer.handle` reads what is there without waiting; a message that arrives in
pieces is buffered until complete. Attach the server to a :class:`Reactor`
(:meth:`VhostUserServer.attach`) and call :meth:`Reactor.poll` from the simulator's loop, or
call :meth:`VhostUserServer.serve_forever` for a stand-alone back-end::

    class Card(VhostUserDevice):
        def vring_ready(self, index, vring): ...   # program the rings' GPAs, base, call fd
        def kick(self, index): ...                 # ring the card's doorbell
        def get_vring_base(self, index): ...       # stop the queue, return its avail index
    server = VhostUserServer("/tmp/vf0.sock", Card())
    reactor = Reactor()
    server.attach(reactor)
    while simulating:
        reactor.poll(0)                            # between simulation steps; never waits
    server.close()

Failure contract: bad input from the front-end (see :class:`ProtocolError`) closes that
connection with exactly one log line (``logging`` at ERROR, logger ``cosim.vhost_user``) that
names the problem, before anything of the bad message reaches the device; the device then gets
:meth:`VhostUserDevice.disconnected` and the server listens again. An exception raised by a
device callback is logged (one line with its traceback) and closes the connection the same way.

Dirty-page logging, for QEMU's live migration: a device that offers ``VHOST_F_LOG_ALL`` in its
features, behind a server that offers ``LOG_SHMFD`` (``protocol_features``), gets QEMU's log
(``SET_LOG_BASE``: a shared-memory bitmap, a bit per 4 KiB guest page, mapped here as a
:class:`DirtyLog`) through :meth:`VhostUserDevice.set_log_base`, and ``LOG_ALL`` in
``set_features`` while QEMU wants every page the device writes marked in it.
``SET_VRING_ADDR`` may then ask for used-ring logging (``VHOST_VRING_F_LOG``, the used ring's
GPA in :attr:`Vring.log_addr`): the device logs its used-ring writes like any other.

What is not supported (the connection is refused with a log line if the front-end asks):
``SET_LOG_FD``, IOTLB, postcopy, in-band notifications, a back-end request channel, config
space messages, memory slots. The protocol features offered by default are ``MQ`` and
``REPLY_ACK`` (both can be turned off); ``LOG_SHMFD`` and ``RARP`` when asked for (``RARP``:
``SEND_RARP`` after a migration, :meth:`VhostUserDevice.send_rarp`). Rings are
split rings (the device decides which virtio features it offers); their size must be a power
of two up to 32768.
"""

from __future__ import annotations

import enum
import errno
import logging
import mmap
import os
import selectors
import socket
import stat
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

__all__ = [
    "Req", "ProtocolError", "AddressError", "Message", "MessageReader", "encode",
    "VringState", "VringAddr", "MemRegionDesc", "pack_mem_table", "parse_mem_table",
    "MemoryRegion", "GuestMemory", "Vring", "Deferred", "VhostUserDevice", "Session",
    "VhostUserServer", "Reactor",
    "DirtyLog", "F_PROTOCOL_FEATURES", "PROTOCOL_F_MQ", "PROTOCOL_F_REPLY_ACK",
    "PROTOCOL_F_LOG_SHMFD", "PROTOCOL_F_RARP", "VHOST_F_LOG_ALL", "VHOST_VRING_F_LOG", "LOG_PAGE",
    "DEFAULT_PROTOCOL_FEATURES", "SUPPORTED_PROTOCOL_FEATURES",
    "VERSION", "FLAG_REPLY", "FLAG_NEED_REPLY", "VRING_IDX_MASK", "VRING_NOFD",
    "MAX_VRING_NUM", "MAX_REGIONS",
]

log = logging.getLogger(__name__)

# ---- constants -------------------------------------------------------------------------------


class Req(enum.IntEnum):
    """Front-end request codes (vhost-user.rst, "Front-end message types")."""
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_SLAVE_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


VERSION = 0x1                  # flags bits 0-1
FLAG_REPLY = 1 << 2            # set on every message the back-end sends
FLAG_NEED_REPLY = 1 << 3       # front-end asks for an ack (only with PROTOCOL_F_REPLY_ACK)

F_PROTOCOL_FEATURES = 30       # virtio feature bit vhost-user reuses: "protocol features exist"
VHOST_F_LOG_ALL = 26           # log every page the device writes (live migration)
VHOST_VRING_F_LOG = 1 << 0     # SET_VRING_ADDR flag: log used-ring writes too
LOG_PAGE = 0x1000              # the log's granule: a bit per 4 KiB of guest-physical memory

PROTOCOL_F_MQ = 0
PROTOCOL_F_LOG_SHMFD = 1       # the log is shared memory (SET_LOG_BASE with an fd)
PROTOCOL_F_RARP = 2            # SEND_RARP: announce a migrated guest's MAC on its behalf
PROTOCOL_F_REPLY_ACK = 3
DEFAULT_PROTOCOL_FEATURES = (1 << PROTOCOL_F_MQ) | (1 << PROTOCOL_F_REPLY_ACK)
SUPPORTED_PROTOCOL_FEATURES = (DEFAULT_PROTOCOL_FEATURES | (1 << PROTOCOL_F_LOG_SHMFD)
                               | (1 << PROTOCOL_F_RARP))

VRING_IDX_MASK = 0xFF          # SET_VRING_KICK/CALL/ERR: ring index in bits 0-7 ...
VRING_NOFD = 1 << 8            # ... and bit 8 = no fd in the ancillary data
MAX_VRING_NUM = 32768
MAX_REGIONS = 8                # VHOST_MEMORY_MAX_NREGIONS

HEADER = struct.Struct("=III")         # request, flags, size (native byte order)
U64 = struct.Struct("=Q")
STATE = struct.Struct("=II")           # index, num
ADDR = struct.Struct("=IIQQQQ")        # index, flags, desc, used, avail, log (user addresses)
LOG = struct.Struct("=QQ")             # SET_LOG_BASE: mmap_size, mmap_offset
MEM_HEAD = struct.Struct("=II")        # nregions, padding
REGION = struct.Struct("=QQQQ")        # guest_phys_addr, memory_size, userspace_addr, offset
MAX_PAYLOAD = MEM_HEAD.size + MAX_REGIONS * REGION.size

_U64_MAX = (1 << 64) - 1
_ALIGN = mmap.ALLOCATIONGRANULARITY


def req_name(request: int) -> str:
    """``"SET_VRING_NUM"`` for a known code, ``"request 99"`` otherwise."""
    try:
        return Req(request).name
    except ValueError:
        return f"request {request}"


class ProtocolError(Exception):
    """The front-end broke the protocol; the connection is closed. The text names the problem."""


class AddressError(ProtocolError, ValueError):
    """An address or range is not covered by the memory table (or by one region of it)."""


# ---- codec ------------------------------------------------------------------------------------

# Payload sizes accepted per request: a set of exact sizes. Requests absent from this table are
# refused (unknown, or known but not supported here).
_MEM_TABLE_SIZES = frozenset(MEM_HEAD.size + k * REGION.size for k in range(MAX_REGIONS + 1))
PAYLOAD_SIZES: dict[int, frozenset[int]] = {
    Req.GET_FEATURES: frozenset({0}),
    Req.SET_FEATURES: frozenset({U64.size}),
    Req.SET_OWNER: frozenset({0}),
    Req.RESET_OWNER: frozenset({0}),
    Req.SET_MEM_TABLE: _MEM_TABLE_SIZES,
    Req.SET_VRING_NUM: frozenset({STATE.size}),
    Req.SET_VRING_ADDR: frozenset({ADDR.size}),
    Req.SET_VRING_BASE: frozenset({STATE.size}),
    Req.GET_VRING_BASE: frozenset({STATE.size}),
    Req.SET_VRING_KICK: frozenset({U64.size}),
    Req.SET_VRING_CALL: frozenset({U64.size}),
    Req.SET_VRING_ERR: frozenset({U64.size}),
    Req.GET_PROTOCOL_FEATURES: frozenset({0}),
    Req.SET_PROTOCOL_FEATURES: frozenset({U64.size}),
    Req.GET_QUEUE_NUM: frozenset({0}),
    Req.SET_VRING_ENABLE: frozenset({STATE.size}),
    Req.SET_LOG_BASE: frozenset({LOG.size}),
    Req.SEND_RARP: frozenset({U64.size}),
}

#: Requests whose answer is a reply of their own (REPLY_ACK adds nothing to them).
REPLYING = frozenset({Req.GET_FEATURES, Req.GET_PROTOCOL_FEATURES, Req.GET_QUEUE_NUM,
                      Req.GET_VRING_BASE, Req.SET_LOG_BASE})


@dataclass
class Message:
    """One vhost-user message: header fields, payload bytes, and the fds that came with it.

    Whoever holds a message owns its ``fds``: take the ones you keep out of the list and
    close the rest (:meth:`close_fds`)."""
    request: int
    flags: int
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return req_name(self.request)

    def close_fds(self) -> None:
        while self.fds:
            _close(self.fds.pop())


def encode(request: int, payload: bytes = b"", flags: int = VERSION | FLAG_REPLY) -> bytes:
    """A whole message (header + payload); the default flags are those of a back-end reply."""
    return HEADER.pack(request, flags, len(payload)) + payload


def check_header(request: int, flags: int, size: int) -> None:
    """Raise :class:`ProtocolError` unless a front-end request may carry this header."""
    if flags & 0x3 != VERSION:
        raise ProtocolError(f"{req_name(request)}: protocol version {flags & 3}, expected 1")
    if flags & FLAG_REPLY:
        raise ProtocolError(f"{req_name(request)}: reply flag set in a request")
    sizes = PAYLOAD_SIZES.get(request)
    if sizes is None:
        if request in Req.__members__.values():
            raise ProtocolError(f"unsupported request {req_name(request)} ({request})")
        raise ProtocolError(f"unknown request {request}")
    if size not in sizes:
        want = " or ".join(str(s) for s in sorted(sizes)) if len(sizes) < 4 else "8+32*n"
        raise ProtocolError(f"{req_name(request)}: payload size {size}, expected {want}")


class MessageReader:
    """Frames a stream of bytes (and the fds received with them) into :class:`Message` s.

    ``feed(data, fds)`` appends what one ``recvmsg`` returned. The fds of a chunk belong to
    the message that holds the chunk's last byte: Linux never lets one ``recvmsg`` read past
    the end of a segment that carried fds, so this is the message they were sent with (and a
    sender that attaches fds to any byte of its message is understood too). ``next()``
    returns a complete message or None, and raises :class:`ProtocolError` as soon as a header
    is bad (before its payload arrives). ``close()`` closes fds not handed out."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._offset = 0                        # stream offset of _buf[0]
        self._fds: list[tuple[int, int]] = []   # (stream offset, fd), in arrival order

    @property
    def pending(self) -> int:
        """Bytes buffered that do not make a whole message yet."""
        return len(self._buf)

    def feed(self, data: bytes, fds: Iterable[int] = ()) -> None:
        self._buf += data
        at = self._offset + max(len(self._buf) - 1, 0)
        self._fds.extend((at, fd) for fd in fds)

    def next(self) -> Optional[Message]:
        if len(self._buf) < HEADER.size:
            return None
        request, flags, size = HEADER.unpack_from(self._buf)
        check_header(request, flags, size)
        end = HEADER.size + size
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[HEADER.size:end])
        del self._buf[:end]
        self._offset += end
        fds = [fd for at, fd in self._fds if at < self._offset]
        self._fds = [(at, fd) for at, fd in self._fds if at >= self._offset]
        return Message(request, flags, payload, fds)

    def close(self) -> None:
        for _, fd in self._fds:
            _close(fd)
        self._fds.clear()
        self._buf.clear()


@dataclass(frozen=True)
class VringState:
    """``struct vhost_vring_state``: a ring index and a number (size, base, enable)."""
    index: int
    num: int

    def pack(self) -> bytes:
        return STATE.pack(self.index, self.num)

    @classmethod
    def unpack(cls, payload: bytes) -> "VringState":
        return cls(*STATE.unpack(payload))


@dataclass(frozen=True)
class VringAddr:
    """``struct vhost_vring_addr``: where a ring's three parts are, as QEMU user addresses."""
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int = 0

    def pack(self) -> bytes:
        return ADDR.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)

    @classmethod
    def unpack(cls, payload: bytes) -> "VringAddr":
        return cls(*ADDR.unpack(payload))


@dataclass(frozen=True)
class MemRegionDesc:
    """One region of a memory table as the front-end describes it."""
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def pack(self) -> bytes:
        return REGION.pack(self.guest_phys_addr, self.memory_size, self.userspace_addr,
                           self.mmap_offset)


def pack_mem_table(regions: Iterable[MemRegionDesc]) -> bytes:
    """The ``SET_MEM_TABLE`` payload for ``regions`` (the fds travel separately)."""
    regions = list(regions)
    return MEM_HEAD.pack(len(regions), 0) + b"".join(r.pack() for r in regions)


def parse_mem_table(payload: bytes) -> list[MemRegionDesc]:
    """Regions of a ``SET_MEM_TABLE`` payload, checked for shape (1..8 regions, non-empty, no
    address wrap-around, no two regions overlapping in guest-physical or user space)."""
    nregions, _ = MEM_HEAD.unpack_from(payload)
    if not 1 <= nregions <= MAX_REGIONS:
        raise ProtocolError(f"SET_MEM_TABLE: {nregions} regions, expected 1..{MAX_REGIONS}")
    if MEM_HEAD.size + nregions * REGION.size > len(payload):
        raise ProtocolError(f"SET_MEM_TABLE: {nregions} regions do not fit in "
                            f"{len(payload)} bytes")
    regions = [MemRegionDesc(*REGION.unpack_from(payload, MEM_HEAD.size + i * REGION.size))
               for i in range(nregions)]
    for i, r in enumerate(regions):
        if r.memory_size == 0:
            raise ProtocolError(f"SET_MEM_TABLE: region {i} is empty")
        for base in (r.guest_phys_addr, r.userspace_addr, r.mmap_offset):
            if base + r.memory_size - 1 > _U64_MAX:
                raise ProtocolError(f"SET_MEM_TABLE: region {i} wraps around 2**64")
    for key in ("guest_phys_addr", "userspace_addr"):
        spans = sorted((getattr(r, key), r.memory_size) for r in regions)
        for (a, n), (b, _) in zip(spans, spans[1:]):
            if a + n > b:
                raise ProtocolError(f"SET_MEM_TABLE: regions overlap at {key} {b:#x}")
    return regions


# ---- guest memory -----------------------------------------------------------------------------


@dataclass
class MemoryRegion:
    """A mapped region: the front-end's description and our shared mapping of it."""
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    mapping: mmap.mmap
    delta: int              # where the region starts inside ``mapping`` (page alignment)

    @property
    def gpa(self) -> int:
        """Short for ``guest_phys_addr``."""
        return self.guest_phys_addr

    @property
    def size(self) -> int:
        """Short for ``memory_size``."""
        return self.memory_size

    @property
    def uva(self) -> int:
        """Short for ``userspace_addr``."""
        return self.userspace_addr

    def contains_gpa(self, gpa: int, length: int) -> bool:
        return (self.guest_phys_addr <= gpa
                and gpa + length <= self.guest_phys_addr + self.memory_size)

    def contains_uva(self, uva: int, length: int) -> bool:
        return (self.userspace_addr <= uva
                and uva + length <= self.userspace_addr + self.memory_size)


class GuestMemory:
    """The guest memory of one ``SET_MEM_TABLE``: regions mapped shared and read-write.

    Addresses: a *GPA* is a guest-physical address (what descriptors hold); a *UVA* is an
    address in QEMU's process (what ``SET_VRING_ADDR`` gives). A range must lie inside one
    region, else :class:`AddressError`. Views returned by :meth:`view` are live windows on
    guest memory and must be dropped when the memory is replaced or closed (the device hears
    of it through ``set_mem_table`` / ``disconnected``); a mapping still viewed at
    :meth:`close` is left for the garbage collector to unmap."""

    def __init__(self, regions: list[MemoryRegion]) -> None:
        self.regions = regions

    @classmethod
    def map(cls, descs: list[MemRegionDesc], fds: list[int]) -> "GuestMemory":
        """Map ``descs[i]`` from ``fds[i]`` (``len(fds) == len(descs)``). The fds are always
        closed (the mappings hold their own reference). :class:`ProtocolError` if an fd is not
        a regular file (memfd, tmpfs, hugetlbfs) long enough for its region, or does not map."""
        regions: list[MemoryRegion] = []
        try:
            for i, (d, fd) in enumerate(zip(descs, fds)):
                try:
                    st = os.fstat(fd)
                except OSError as e:
                    raise ProtocolError(f"SET_MEM_TABLE: region {i} fd: {e.strerror}") from None
                if not stat.S_ISREG(st.st_mode):
                    raise ProtocolError(f"SET_MEM_TABLE: region {i} fd is not a memory file")
                if st.st_size < d.mmap_offset + d.memory_size:
                    raise ProtocolError(
                        f"SET_MEM_TABLE: region {i} ends at file offset "
                        f"{d.mmap_offset + d.memory_size:#x}, file has {st.st_size:#x} bytes")
                start = d.mmap_offset - d.mmap_offset % _ALIGN
                delta = d.mmap_offset - start
                try:
                    mm = mmap.mmap(fd, delta + d.memory_size, flags=mmap.MAP_SHARED,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
                except (OSError, ValueError, OverflowError) as e:
                    raise ProtocolError(f"SET_MEM_TABLE: region {i} does not map: {e}") from None
                regions.append(MemoryRegion(d.guest_phys_addr, d.memory_size,
                                            d.userspace_addr, d.mmap_offset, mm, delta))
        except BaseException:
            cls(regions).close()
            raise
        finally:
            for fd in fds:
                _close(fd)
        return cls(regions)

    def _region_uva(self, uva: int, length: int) -> MemoryRegion:
        for r in self.regions:
            if r.contains_uva(uva, length):
                return r
        raise AddressError(f"user address range {uva:#x}+{length:#x} is not in the memory table")

    def _region_gpa(self, gpa: int, length: int) -> MemoryRegion:
        for r in self.regions:
            if r.contains_gpa(gpa, length):
                return r
        raise AddressError(f"guest-physical range {gpa:#x}+{length:#x} is not in the memory "
                           f"table")

    def uva_to_gpa(self, uva: int, length: int = 1) -> int:
        """GPA of QEMU user address ``uva``; the ``length`` bytes from it must be in one
        region."""
        r = self._region_uva(uva, length)
        return r.guest_phys_addr + (uva - r.userspace_addr)

    def has_gpa(self, gpa: int, length: int = 1) -> bool:
        return any(r.contains_gpa(gpa, length) for r in self.regions)

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable memoryview of guest memory ``[gpa, gpa + length)``."""
        r = self._region_gpa(gpa, length)
        start = r.delta + gpa - r.guest_phys_addr
        return memoryview(r.mapping)[start:start + length]

    def read(self, gpa: int, length: int) -> bytes:
        r = self._region_gpa(gpa, length)
        start = r.delta + gpa - r.guest_phys_addr
        return r.mapping[start:start + length]

    def write(self, gpa: int, data: bytes) -> None:
        r = self._region_gpa(gpa, len(data))
        start = r.delta + gpa - r.guest_phys_addr
        r.mapping[start:start + len(data)] = data

    def close(self) -> None:
        for r in self.regions:
            try:
                r.mapping.close()
            except BufferError:
                log.warning("guest memory at GPA %#x is still viewed; the garbage collector "
                            "will unmap it", r.guest_phys_addr)
        self.regions = []


# ---- rings and the device interface -----------------------------------------------------------


def ring_sizes(num: int) -> tuple[int, int, int]:
    """Bytes of a split ring's descriptor table, avail ring and used ring, the event-index
    fields included (virtio 1.x, 2.7)."""
    return 16 * num, 6 + 2 * num, 6 + 8 * num


@dataclass
class Vring:
    """What the back-end knows of one virtqueue (a split ring).

    ``desc``, ``avail``, ``used`` are GPAs (None until ``SET_VRING_ADDR``; the ``*_uva`` fields
    keep QEMU's user addresses). ``base`` is the next avail index to process: the value of
    ``SET_VRING_BASE``, or what the device reported when the ring was last stopped.
    ``kick_fd`` / ``call_fd`` / ``err_fd`` are eventfds or None (no fd: poll the ring /
    nobody to tell); the server owns and closes them. ``started`` says ``vring_ready`` was
    delivered and no stop since. The device may keep this object: the server updates
    ``call_fd`` in place when the front-end changes it. ``log_addr``: the used ring's GPA when
    the front-end asked for used-ring logging (``VHOST_VRING_F_LOG``), else None."""
    index: int
    num: int = 0
    base: int = 0
    flags: int = 0
    log_addr: Optional[int] = None
    desc_uva: Optional[int] = None
    avail_uva: Optional[int] = None
    used_uva: Optional[int] = None
    desc: Optional[int] = None
    avail: Optional[int] = None
    used: Optional[int] = None
    kick_set: bool = False
    kick_fd: Optional[int] = None
    call_fd: Optional[int] = None
    err_fd: Optional[int] = None
    enabled: bool = False
    started: bool = False
    calls: int = 0

    def call(self) -> bool:
        """Signal "used buffers" to the front-end: add 1 to the call eventfd. Never blocks.
        False when there is no call fd (or it could not be written)."""
        if self.call_fd is None:
            return False
        try:
            os.write(self.call_fd, U64.pack(1))
        except (BlockingIOError, OSError):
            return False
        self.calls += 1
        return True

    def translate(self, memory: "GuestMemory") -> tuple[int, int, int]:
        """GPAs of (desc, avail, used), each whole part checked against ``memory``."""
        dsz, asz, usz = ring_sizes(self.num or 1)
        return (memory.uva_to_gpa(self.desc_uva, dsz),
                memory.uva_to_gpa(self.avail_uva, asz),
                memory.uva_to_gpa(self.used_uva, usz))


class Deferred:
    """A value the device gives later: :meth:`VhostUserDevice.get_vring_base` may return one
    (the card stops its queue over simulated bus cycles) and call :meth:`resolve` when done,
    from any later callback or coroutine of the same thread.

    Until then the server reads no further message of that front-end (QEMU waits for the
    reply anyway) and the ring gets no kick; on :meth:`resolve` the stop completes, the
    message that asked for it is answered (or finished, if it was a reconfiguration) and the
    buffered messages are served. Resolving after the connection ended is harmless."""

    def __init__(self) -> None:
        self.done = False
        self.value: Optional[int] = None
        self._callbacks: list[Callable[[int], None]] = []

    def resolve(self, value: int) -> None:
        if self.done:
            raise RuntimeError("Deferred resolved twice")
        self.done, self.value = True, value
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(value)

    def add_done_callback(self, callback: Callable[[int], None]) -> None:
        """``callback(value)`` on :meth:`resolve` (at once if already resolved)."""
        if self.done:
            callback(self.value)
        else:
            self._callbacks.append(callback)


class _Pending(Exception):
    """Internal: a ring stop is waiting for a :class:`Deferred`."""

    def __init__(self, vring: "Vring", deferred: Deferred) -> None:
        super().__init__(vring.index)
        self.vring, self.deferred = vring, deferred


class VhostUserDevice:
    """The device behind a :class:`VhostUserServer`; subclass and override.

    Every callback is made from inside :meth:`VhostUserServer.handle`, after the message that
    caused it was checked, and must not block. A callback may raise :class:`ProtocolError`
    to refuse (the connection is closed with that text as its log line); any other exception
    is logged with its traceback and closes the connection too.

    Ring life cycle, as the server drives it: ``vring_ready`` once a ring has everything;
    ``get_vring_base`` when it stops. It stops on ``GET_VRING_BASE`` (its kick fd is dropped
    then, so it starts again only after a new ``SET_VRING_KICK``), on ``SET_VRING_ENABLE 0``
    (the spec's "started but disabled" state, where TX would be consumed and dropped, is not
    modelled: a disabled ring is stopped), on ``RESET_OWNER``, and around a change of its size,
    base, addresses or kick fd (stopped, changed, ready again from the base the device
    reported). A new call fd is put into the same :class:`Vring` object without a stop; a new
    memory table comes through ``set_mem_table`` while rings run (they keep their GPAs, else
    the table is refused). QEMU 7.2 enables both rings before it configures them and does not
    enable them again when it restarts them: ``enabled`` outlives a stop."""

    def features(self) -> int:
        """Virtio feature bits offered (the server adds ``F_PROTOCOL_FEATURES`` itself)."""
        return 1 << 32                        # VIRTIO_F_VERSION_1

    def num_queues(self) -> int:
        """Number of virtqueues; ring indexes at or above it are refused. ``GET_QUEUE_NUM`` is
        answered with ``max(1, num_queues() // 2)``: queue pairs, as vhost-user net counts."""
        return 2

    def set_features(self, features: int) -> None:
        """The features the driver accepted (a subset of :meth:`features`)."""

    def set_mem_table(self, memory: GuestMemory) -> None:
        """New guest memory; drop every view of the previous one before returning."""

    def vring_ready(self, index: int, vring: Vring) -> None:
        """Ring ``index`` may be processed from ``vring.base`` on: it has a size, addresses
        inside the memory table, a kick (an fd, or polling) and is enabled. Look at the avail
        ring at once: kicks that came before this call are not repeated."""

    def get_vring_base(self, index: int) -> "int | Deferred":
        """Stop ring ``index`` (no access after returning) and give the next avail index it
        would have processed, now or through a :class:`Deferred` (stop accessing the ring
        before resolving it). Only called for a started ring."""
        return 0

    def kick(self, index: int) -> None:
        """The guest kicked started ring ``index`` (its eventfd fired)."""

    def set_log_base(self, log: "DirtyLog") -> None:
        """QEMU's dirty log (replacing any earlier one: drop views of that before returning).
        Marking starts when ``set_features`` has ``VHOST_F_LOG_ALL`` and stops when a later
        ``set_features`` has not. Only called when ``features`` offers ``VHOST_F_LOG_ALL``."""
        raise ProtocolError("SET_LOG_BASE: this device does not log")

    def send_rarp(self, mac: bytes) -> None:
        """Broadcast a RARP from ``mac`` (6 bytes) into the network on behalf of a guest that
        just migrated here and cannot announce itself (no ``GUEST_ANNOUNCE``): the switches
        learn where it is now. Only called behind a server that offers ``PROTOCOL_F_RARP``."""
        raise ProtocolError("SEND_RARP: this device does not announce")

    def disconnected(self) -> None:
        """The front-end is gone: stop every ring, drop every view of guest memory. Called
        once per connection, whatever ended it."""


class DirtyLog:
    """QEMU's dirty log of one ``SET_LOG_BASE``, mapped shared: bit ``p % 8`` of byte ``p // 8``
    stands for the guest page at GPA ``p * LOG_PAGE``. The device only ever sets bits (QEMU
    harvests them with an atomic exchange); :meth:`mark` sets those of a GPA range (a
    read-modify-write of whole bytes: for a device whose writes nothing else marks at the same
    moment; the card marks through its own DMA). ``view`` is the live memory for a device that
    writes the log itself; drop views before :meth:`close`."""

    def __init__(self, mapping: mmap.mmap, delta: int, size: int) -> None:
        self.mapping, self.delta, self.size = mapping, delta, size

    @classmethod
    def map(cls, size: int, offset: int, fd: int) -> "DirtyLog":
        """Map ``size`` bytes of ``fd`` from ``offset``; closes ``fd``. :class:`ProtocolError`
        if it is not a memory file that long or does not map."""
        try:
            if size == 0:
                raise ProtocolError("SET_LOG_BASE: an empty log")
            try:
                st = os.fstat(fd)
            except OSError as e:
                raise ProtocolError(f"SET_LOG_BASE: log fd: {e.strerror}") from None
            if not stat.S_ISREG(st.st_mode) or st.st_size < offset + size:
                raise ProtocolError(f"SET_LOG_BASE: the log fd holds {st.st_size:#x} bytes, "
                                    f"not {offset + size:#x}")
            start = offset - offset % _ALIGN
            try:
                mm = mmap.mmap(fd, offset - start + size, flags=mmap.MAP_SHARED,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
            except (OSError, ValueError, OverflowError) as e:
                raise ProtocolError(f"SET_LOG_BASE: the log does not map: {e}") from None
            return cls(mm, offset - start, size)
        finally:
            _close(fd)

    @property
    def pages(self) -> int:
        """Guest pages the log covers (from GPA 0)."""
        return 8 * self.size

    def view(self) -> memoryview:
        return memoryview(self.mapping)[self.delta:self.delta + self.size]

    def mark(self, gpa: int, length: int) -> None:
        """Mark the pages of ``[gpa, gpa + length)`` dirty (those past the log are ignored)."""
        if length <= 0:
            return
        for page in range(gpa // LOG_PAGE, min((gpa + length - 1) // LOG_PAGE + 1, self.pages)):
            i = self.delta + page // 8
            self.mapping[i] |= 1 << (page % 8)

    def is_marked(self, gpa: int) -> bool:
        page = gpa // LOG_PAGE
        return page < self.pages and bool(self.mapping[self.delta + page // 8] >> (page % 8) & 1)

    def close(self) -> None:
        try:
            self.mapping.close()
        except BufferError:
            log.warning("the dirty log is still viewed; the garbage collector will unmap it")


# ---- one connection's protocol state ----------------------------------------------------------


class Session:
    """The protocol state of one front-end connection, without sockets.

    :meth:`handle_message` applies one message and returns the bytes to send back (possibly
    none); it raises :class:`ProtocolError` with nothing applied if the message is bad.
    ``watch(fd, index)`` and ``unwatch(fd)`` tell the owner which kick fds to wait on (unwatch
    comes before the fd is closed); :meth:`kicked` is what to call when one is readable.

    When the device answers a stop with a :class:`Deferred`, :meth:`handle_message` returns
    no reply and :attr:`pending` holds that Deferred: feed no message until it is resolved,
    then call :meth:`resume` with its value, which finishes the held message."""

    def __init__(self, device: VhostUserDevice, *, protocol_features: int,
                 watch: Callable[[int, int], None] = lambda fd, index: None,
                 unwatch: Callable[[int], None] = lambda fd: None) -> None:
        self.device = device
        self.protocol_offer = protocol_features
        self._watch, self._unwatch = watch, unwatch
        self.pending: Optional[Deferred] = None
        self._held: Optional[tuple[Vring, Message]] = None
        self.vrings = [Vring(i) for i in range(device.num_queues())]
        self.features = 0                 # acked virtio features (F_PROTOCOL_FEATURES too)
        self.protocol_features = 0        # acked protocol features
        self.owner = False
        self.memory: Optional[GuestMemory] = None
        self.log: Optional[DirtyLog] = None
        self.messages = 0
        self._handlers = {
            Req.GET_FEATURES: self._get_features,
            Req.SET_FEATURES: self._set_features,
            Req.SET_OWNER: self._set_owner,
            Req.RESET_OWNER: self._reset_owner,
            Req.SET_MEM_TABLE: self._set_mem_table,
            Req.SET_VRING_NUM: self._set_vring_num,
            Req.SET_VRING_ADDR: self._set_vring_addr,
            Req.SET_VRING_BASE: self._set_vring_base,
            Req.GET_VRING_BASE: self._get_vring_base,
            Req.SET_VRING_KICK: self._set_vring_fd,
            Req.SET_VRING_CALL: self._set_vring_fd,
            Req.SET_VRING_ERR: self._set_vring_fd,
            Req.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Req.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Req.GET_QUEUE_NUM: self._get_queue_num,
            Req.SET_VRING_ENABLE: self._set_vring_enable,
            Req.SET_LOG_BASE: self._set_log_base,
            Req.SEND_RARP: self._send_rarp,
        }

    # -- entry points

    def handle_message(self, msg: Message) -> list[bytes]:
        """Apply ``msg``; the replies to send. Consumes ``msg.fds`` (kept or closed), unless
        the message waits for a :class:`Deferred` (then it keeps them, see :attr:`pending`)."""
        if self.pending is not None:
            raise RuntimeError("handle_message while a stop is pending")
        fds = list(msg.fds)
        try:
            handler = self._handlers.get(msg.request)
            if handler is None:                        # MessageReader already refused it
                raise ProtocolError(f"unsupported request {msg.name}")
            replies = handler(msg)
        except _Pending as pending:
            msg.fds = fds                              # nothing was applied: they are open
            self.pending, self._held = pending.deferred, (pending.vring, msg)
            return []
        except BaseException:
            msg.close_fds()
            raise
        msg.close_fds()
        self.messages += 1
        if (msg.flags & FLAG_NEED_REPLY and msg.request not in REPLYING
                and self.protocol_features & (1 << PROTOCOL_F_REPLY_ACK)):
            replies.append(encode(msg.request, U64.pack(0)))
        return replies

    def kicked(self, index: int) -> None:
        """Kick fd of ring ``index`` readable: drain it, tell the device if the ring runs."""
        vring = self.vrings[index]
        if vring.kick_fd is None:
            return
        try:
            data = os.read(vring.kick_fd, 8)
        except (BlockingIOError, InterruptedError):
            return
        if not data:                     # a pipe whose writer is gone: poll from now on
            log.warning("vring %d: kick fd closed by the front-end; polling", index)
            self._replace_fd(vring, "kick_fd", None)
        if vring.started:
            self.device.kick(index)

    def close(self) -> None:
        """Release every fd and mapping (the device has been told already)."""
        if self._held is not None:
            self._held[1].close_fds()
            self.pending = self._held = None
        for vring in self.vrings:
            vring.started = False
            self._replace_fd(vring, "kick_fd", None)
            self._replace_fd(vring, "call_fd", None)
            self._replace_fd(vring, "err_fd", None)
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        if self.log is not None:
            self.log.close()
            self.log = None

    # -- helpers

    @property
    def protocol_negotiated(self) -> bool:
        return bool(self.features & (1 << F_PROTOCOL_FEATURES))

    def _vring(self, msg: Message, index: int) -> Vring:
        if index >= len(self.vrings):
            raise ProtocolError(f"{msg.name}: vring index {index}, the device has "
                                f"{len(self.vrings)}")
        return self.vrings[index]

    @staticmethod
    def _fds(msg: Message, count: int) -> list[int]:
        if len(msg.fds) != count:
            raise ProtocolError(f"{msg.name}: {len(msg.fds)} fds attached, expected {count}")
        fds, msg.fds = msg.fds, []
        return fds

    def _replace_fd(self, vring: Vring, attr: str, fd: Optional[int]) -> None:
        old = getattr(vring, attr)
        if old is not None:
            if attr == "kick_fd":
                self._unwatch(old)
            _close(old)
        setattr(vring, attr, fd)
        if fd is not None:
            if attr == "kick_fd":
                self._watch(fd, vring.index)

    def _stop(self, vring: Vring) -> None:
        """Stop a started ring (``get_vring_base``); raises :class:`_Pending` if the device
        answers later. Comes before any other change a handler makes."""
        if vring.started:
            vring.started = False
            base = self.device.get_vring_base(vring.index)
            if isinstance(base, Deferred):
                if not base.done:
                    raise _Pending(vring, base)
                base = base.value
            vring.base = int(base) & 0xFFFF

    def resume(self, value: int) -> tuple[Message, list[bytes]]:
        """The pending stop ended with avail index ``value``: finish the held message (its
        handler runs again, the ring being stopped now); the message and its replies. The
        message may wait again (another ring to stop): see :attr:`pending`."""
        vring, msg = self._held
        vring.base = int(value) & 0xFFFF
        self.pending = self._held = None
        return msg, self.handle_message(msg)

    def _maybe_start(self, vring: Vring) -> None:
        if (not vring.started and vring.num and vring.desc is not None and vring.kick_set
                and self.memory is not None
                and (vring.enabled or not self.protocol_negotiated)):
            vring.started = True
            self.device.vring_ready(vring.index, vring)

    def _reconfigure(self, vring: Vring, apply: Callable[[], None]) -> None:
        """Stop ``vring`` if it runs, apply a change, start it again if it can."""
        self._stop(vring)
        apply()
        self._maybe_start(vring)

    @staticmethod
    def _u64(msg: Message) -> int:
        return U64.unpack(msg.payload)[0]

    # -- handlers: each checks everything first, then changes state, then calls the device

    def _get_features(self, msg: Message) -> list[bytes]:
        self._fds(msg, 0)
        offer = self.device.features() | (1 << F_PROTOCOL_FEATURES)
        return [encode(msg.request, U64.pack(offer))]

    def _set_features(self, msg: Message) -> list[bytes]:
        self._fds(msg, 0)
        value = self._u64(msg)
        offer = self.device.features() | (1 << F_PROTOCOL_FEATURES)
        if value & ~offer:
            raise ProtocolError(f"SET_FEATURES: bits {value & ~offer:#x} were not offered")
        self.features = value
        self.device.set_features(value & ~(1 << F_PROTOCOL_FEATURES))
        for vring in self.vrings:
            self._maybe_start(vring)
        return []

    def _set_owner(self, msg: Message) -> list[bytes]:
        self._fds(msg, 0)
        self.owner = True
        return []

    def _reset_owner(self, msg: Message) -> list[bytes]:
        """Deprecated; the spec allows "disable all rings", which is what this does."""
        self._fds(msg, 0)
        for vring in self.vrings:
            self._stop(vring)
            vring.enabled = False
        return []

    def _get_protocol_features(self, msg: Message) -> list[bytes]:
        self._fds(msg, 0)
        return [encode(msg.request, U64.pack(self.protocol_offer))]

    def _set_protocol_features(self, msg: Message) -> list[bytes]:
        self._fds(msg, 0)
        value = self._u64(msg)
        if value & ~self.protocol_offer:
            raise ProtocolError(f"SET_PROTOCOL_FEATURES: bits {value & ~self.protocol_offer:#x} "
                                f"were not offered")
        self.protocol_features = value
        return []

    def _get_queue_num(self, msg: Message) -> list[bytes]:
        self._fds(msg, 0)
        return [encode(msg.request, U64.pack(max(1, len(self.vrings) // 2)))]

    def _set_mem_table(self, msg: Message) -> list[bytes]:
        """A started ring must keep its GPAs in the new table (else the front-end changed memory
        under a running ring: refused); a ring not started whose user addresses the new table
        does not cover, or maps elsewhere, forgets them (a new ``SET_VRING_ADDR`` follows)."""
        descs = parse_mem_table(msg.payload)
        memory = GuestMemory.map(descs, self._fds(msg, len(descs)))
        stale = []
        for vring in self.vrings:
            if vring.desc_uva is None:
                continue
            try:
                gpas = vring.translate(memory)
            except AddressError:
                gpas = None
            if gpas != (vring.desc, vring.avail, vring.used):
                if vring.started:
                    memory.close()
                    raise ProtocolError(f"SET_MEM_TABLE: running vring {vring.index} is not at "
                                        f"the same guest-physical addresses in the new table")
                stale.append(vring)
        for vring in stale:
            vring.desc_uva = vring.avail_uva = vring.used_uva = None
            vring.desc = vring.avail = vring.used = None
        old, self.memory = self.memory, memory
        try:
            self.device.set_mem_table(memory)
        finally:
            if old is not None:
                old.close()
        for vring in self.vrings:
            self._maybe_start(vring)
        return []

    def _set_vring_num(self, msg: Message) -> list[bytes]:
        self._fds(msg, 0)
        state = VringState.unpack(msg.payload)
        vring = self._vring(msg, state.index)
        num = state.num
        if not 0 < num <= MAX_VRING_NUM or num & (num - 1):
            raise ProtocolError(f"SET_VRING_NUM: ring {state.index} size {num} is not a power "
                                f"of two up to {MAX_VRING_NUM}")
        gpas = None
        if vring.desc_uva is not None and self.memory is not None:
            trial = Vring(vring.index, num=num, desc_uva=vring.desc_uva,
                          avail_uva=vring.avail_uva, used_uva=vring.used_uva)
            try:
                gpas = trial.translate(self.memory)
            except AddressError as e:
                raise ProtocolError(f"SET_VRING_NUM: ring {state.index} of size {num} does not "
                                    f"fit: {e}") from None

        def apply():
            vring.num = num
            if gpas is not None:
                vring.desc, vring.avail, vring.used = gpas
        self._reconfigure(vring, apply)
        return []

    def _set_vring_addr(self, msg: Message) -> list[bytes]:
        self._fds(msg, 0)
        addr = VringAddr.unpack(msg.payload)
        vring = self._vring(msg, addr.index)
        if addr.flags & VHOST_VRING_F_LOG and not self.device.features() >> VHOST_F_LOG_ALL & 1:
            raise ProtocolError(f"SET_VRING_ADDR: ring {addr.index} asks for used-ring logging, "
                                f"which this device does not offer")
        if addr.flags & ~VHOST_VRING_F_LOG:
            raise ProtocolError(f"SET_VRING_ADDR: ring {addr.index} flags {addr.flags:#x}")
        for name, value, align in (("desc", addr.desc, 16), ("avail", addr.avail, 2),
                                   ("used", addr.used, 4)):
            if value % align:
                raise ProtocolError(f"SET_VRING_ADDR: ring {addr.index} {name} address "
                                    f"{value:#x} is not {align}-byte aligned")
        if self.memory is None:
            raise ProtocolError(f"SET_VRING_ADDR: ring {addr.index} before SET_MEM_TABLE")
        trial = Vring(vring.index, num=vring.num, desc_uva=addr.desc, avail_uva=addr.avail,
                      used_uva=addr.used)
        try:
            gpas = trial.translate(self.memory)
        except AddressError as e:
            raise ProtocolError(f"SET_VRING_ADDR: ring {addr.index}: {e}") from None

        def apply():
            vring.flags = addr.flags
            vring.log_addr = addr.log if addr.flags & VHOST_VRING_F_LOG else None
            vring.desc_uva, vring.avail_uva, vring.used_uva = addr.desc, addr.avail, addr.used
            vring.desc, vring.avail, vring.used = gpas
        if (vring.started and gpas == (vring.desc, vring.avail, vring.used)
                and addr.flags != vring.flags):
            apply()          # (logging turned on or off under a running ring: no stop)
            return []
        self._reconfigure(vring, apply)
        return []

    def _set_log_base(self, msg: Message) -> list[bytes]:
        if not self.protocol_features & (1 << PROTOCOL_F_LOG_SHMFD):
            raise ProtocolError("SET_LOG_BASE without LOG_SHMFD negotiated")
        if not self.device.features() >> VHOST_F_LOG_ALL & 1:
            raise ProtocolError("SET_LOG_BASE: this device does not offer LOG_ALL")
        size, offset = LOG.unpack(msg.payload)
        dirty = DirtyLog.map(size, offset, self._fds(msg, 1)[0])
        old, self.log = self.log, dirty
        try:
            self.device.set_log_base(dirty)
        except BaseException:
            self.log = old
            dirty.close()
            raise
        if old is not None:
            old.close()
        return [encode(msg.request, U64.pack(0))]     # (QEMU waits for this reply)

    def _send_rarp(self, msg: Message) -> list[bytes]:
        self._fds(msg, 0)
        if not self.protocol_features & (1 << PROTOCOL_F_RARP):
            raise ProtocolError("SEND_RARP without RARP negotiated")
        mac = msg.payload[:6]
        if mac[0] & 1 or mac == bytes(6):
            raise ProtocolError(f"SEND_RARP: {mac.hex(':')} is not a station's address")
        self.device.send_rarp(mac)
        return []

    def _set_vring_base(self, msg: Message) -> list[bytes]:
        self._fds(msg, 0)
        state = VringState.unpack(msg.payload)
        vring = self._vring(msg, state.index)
        if state.num > 0xFFFF:
            raise ProtocolError(f"SET_VRING_BASE: ring {state.index} base {state.num:#x} is "
                                f"not a 16-bit index")

        def apply():
            vring.base = state.num
        self._reconfigure(vring, apply)
        return []

    def _get_vring_base(self, msg: Message) -> list[bytes]:
        self._fds(msg, 0)
        state = VringState.unpack(msg.payload)
        vring = self._vring(msg, state.index)
        self._stop(vring)
        self._replace_fd(vring, "kick_fd", None)     # a stopped ring restarts on a new kick
        vring.kick_set = False
        return [encode(msg.request, VringState(state.index, vring.base).pack())]

    def _set_vring_fd(self, msg: Message) -> list[bytes]:
        value = self._u64(msg)
        index, nofd = value & VRING_IDX_MASK, bool(value & VRING_NOFD)
        if value & ~(VRING_IDX_MASK | VRING_NOFD):
            raise ProtocolError(f"{msg.name}: payload {value:#x} has bits beyond 0-8")
        vring = self._vring(msg, index)
        fds = self._fds(msg, 0 if nofd else 1)
        fd = fds[0] if fds else None
        if fd is not None:
            try:
                os.set_blocking(fd, False)
            except OSError as e:
                _close(fd)
                raise ProtocolError(f"{msg.name}: ring {index} fd: {e.strerror}") from None
        if msg.request == Req.SET_VRING_KICK:
            def apply():
                self._replace_fd(vring, "kick_fd", fd)
                vring.kick_set = True
            try:
                self._reconfigure(vring, apply)
            except _Pending:
                raise                                  # handle_message keeps the fd
            except BaseException:
                if fd is not None and vring.kick_fd != fd:
                    _close(fd)
                raise
        elif msg.request == Req.SET_VRING_CALL:
            self._replace_fd(vring, "call_fd", fd)
        else:
            self._replace_fd(vring, "err_fd", fd)
        return []

    def _set_vring_enable(self, msg: Message) -> list[bytes]:
        self._fds(msg, 0)
        state = VringState.unpack(msg.payload)
        vring = self._vring(msg, state.index)
        if state.num not in (0, 1):
            raise ProtocolError(f"SET_VRING_ENABLE: ring {state.index} value {state.num}, "
                                f"expected 0 or 1")

        def apply():
            vring.enabled = bool(state.num)
        if state.num:
            apply()
            self._maybe_start(vring)
        else:
            self._reconfigure(vring, apply)
        return []


def describe(msg: Message, replies: Iterable[bytes] = ()) -> str:
    """One-line trace of a (valid) request and of our ``replies`` to it (``-> value``)."""
    p, r = msg.payload, msg.request
    text = msg.name
    if r in (Req.SET_FEATURES, Req.SET_PROTOCOL_FEATURES):
        text += f" {U64.unpack(p)[0]:#x}"
    elif r in (Req.SET_VRING_NUM, Req.SET_VRING_BASE, Req.GET_VRING_BASE,
               Req.SET_VRING_ENABLE):
        s = VringState.unpack(p)
        text += f" index={s.index} num={s.num}"
    elif r == Req.SET_VRING_ADDR:
        a = VringAddr.unpack(p)
        text += (f" index={a.index} flags={a.flags:#x} desc={a.desc:#x} used={a.used:#x} "
                 f"avail={a.avail:#x}" + (f" log={a.log:#x}" if a.flags & VHOST_VRING_F_LOG else ""))
    elif r == Req.SET_LOG_BASE:
        size, offset = LOG.unpack(p)
        text += f" size={size:#x} offset={offset:#x}"
    elif r == Req.SEND_RARP:
        text += f" mac={p[:6].hex(':')}"
    elif r in (Req.SET_VRING_KICK, Req.SET_VRING_CALL, Req.SET_VRING_ERR):
        v = U64.unpack(p)[0]
        text += f" index={v & VRING_IDX_MASK}" + (" nofd" if v & VRING_NOFD else " fd")
    elif r == Req.SET_MEM_TABLE:
        for d in parse_mem_table(p):
            text += (f" [gpa={d.guest_phys_addr:#x} size={d.memory_size:#x} "
                     f"uva={d.userspace_addr:#x} off={d.mmap_offset:#x}]")
    if msg.flags & FLAG_NEED_REPLY:
        text += " need_reply"
    for reply in replies:
        body = reply[HEADER.size:]
        if r == Req.GET_VRING_BASE:
            text += f" -> num={VringState.unpack(body).num}"
        else:
            text += f" -> {U64.unpack(body)[0]:#x}"
    return text


# ---- the server -------------------------------------------------------------------------------


class VhostUserServer:
    """A vhost-user back-end listening on unix socket ``path``, serving ``device``.

    One front-end at a time: a second one that connects while the first is served is accepted
    and closed at once (with a log line), after the first connection was read so that a
    front-end that just went away is not mistaken for a busy one. After a disconnect, the next
    front-end (a new QEMU on the same path) is served with fresh protocol state.

    A stale socket file at ``path`` (nobody listening) is removed; a live one, or a file that
    is not a socket, raises ``FileExistsError``.

    Non-blocking: :meth:`fds` lists the descriptors to wait for (readable), :meth:`handle`
    serves one of them, :meth:`attach` keeps a :class:`Reactor` registered with them instead.
    ``log_messages=True`` logs every valid request at INFO (else DEBUG). ``messages`` counts
    the requests of all connections; ``trace`` (if a list) gets each request's
    :func:`describe` line."""

    def __init__(self, path: str, device: VhostUserDevice, *,
                 protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
                 log_messages: bool = False, trace: Optional[list] = None) -> None:
        if protocol_features & ~SUPPORTED_PROTOCOL_FEATURES:
            raise ValueError(f"protocol features {protocol_features:#x} not supported")
        self.path = os.fspath(path)
        self.device = device
        self.protocol_features = protocol_features
        self.trace = trace
        self._trace_level = logging.INFO if log_messages else logging.DEBUG
        self.connections = 0
        self.messages = 0
        self._conn: Optional[socket.socket] = None
        self._reader: Optional[MessageReader] = None
        self.session: Optional[Session] = None
        self._watched: dict[int, Callable[[], None]] = {}
        self._reactor: Optional[Reactor] = None
        self._running = False
        self._listen = self._open_listener()
        self._watch(self._listen.fileno(), self._on_listen)

    # -- the socket file

    def _open_listener(self) -> socket.socket:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise FileExistsError(f"{self.path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.setblocking(False)           # a live server with a full backlog: EAGAIN
            try:
                probe.connect(self.path)
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(self.path)
            except BlockingIOError:
                raise FileExistsError(f"{self.path}: another back-end is listening") from None
            else:
                raise FileExistsError(f"{self.path}: another back-end is listening")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            sock.listen(1)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    # -- descriptors and dispatch

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def fds(self) -> list[int]:
        """The descriptors to wait on, for reading. Changes as front-ends come and go and as
        kick fds are set: ask again after every :meth:`handle` (or use :meth:`attach`)."""
        return list(self._watched)

    def handle(self, fd: int) -> bool:
        """Serve descriptor ``fd`` (one of :meth:`fds`) without blocking; False if it is not
        ours (any more)."""
        callback = self._watched.get(fd)
        if callback is None:
            return False
        callback()
        return True

    on_readable = handle

    def attach(self, reactor: "Reactor") -> None:
        """Register every descriptor with ``reactor`` now and as they change."""
        self.detach()
        self._reactor = reactor
        for fd, callback in self._watched.items():
            reactor.register(fd, callback)

    def detach(self) -> None:
        if self._reactor is not None:
            for fd in self._watched:
                self._reactor.unregister(fd)
            self._reactor = None

    def _watch(self, fd: int, callback: Callable[[], None]) -> None:
        self._watched[fd] = callback
        if self._reactor is not None:
            self._reactor.register(fd, callback)

    def _unwatch(self, fd: int) -> None:
        if self._watched.pop(fd, None) is not None and self._reactor is not None:
            self._reactor.unregister(fd)

    # -- connections

    def _on_listen(self) -> None:
        if self._conn is not None:
            self._on_conn()              # a front-end that just left makes room for this one
        try:
            conn, _ = self._listen.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        if self._conn is not None:
            log.warning("vhost-user %s: a second front-end connected while one is served; "
                        "closing it", self.path)
            conn.close()
            return
        conn.setblocking(False)
        self.connections += 1
        self._conn = conn
        self._reader = MessageReader()
        self.session = Session(self.device, protocol_features=self.protocol_features,
                               watch=self._watch_kick, unwatch=self._unwatch)
        self._watch(conn.fileno(), self._on_conn)
        log.info("vhost-user %s: front-end connected", self.path)

    def _watch_kick(self, fd: int, index: int) -> None:
        session = self.session
        self._watch(fd, lambda: self._guard(lambda: session.kicked(index)))

    def _guard(self, action: Callable[[], None]) -> None:
        """Run ``action`` for the current connection; a failure closes it."""
        try:
            action()
        except ProtocolError as e:
            log.error("vhost-user %s: %s; closing the connection", self.path, e)
            self._drop()
        except Exception:
            log.exception("vhost-user %s: device callback failed; closing the connection",
                          self.path)
            self._drop()

    def _on_conn(self) -> None:
        self._guard(self._read_available)

    def _read_available(self) -> None:
        conn, reader, session = self._conn, self._reader, self.session
        while self._conn is conn and conn is not None:
            try:
                data, fds, flags, _ = socket.recv_fds(conn, 65536, MAX_REGIONS,
                                                      socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except (ConnectionResetError, BrokenPipeError) as e:
                self._disconnect(e.strerror or "connection reset")
                return
            if flags & socket.MSG_CTRUNC:
                for fd in fds:
                    _close(fd)
                raise ProtocolError(f"more than {MAX_REGIONS} fds in one message "
                                    f"(ancillary data truncated)")
            if not data:
                for fd in fds:
                    _close(fd)
                if reader.pending:
                    log.info("vhost-user %s: front-end left %d bytes of a message unread",
                             self.path, reader.pending)
                self._disconnect("EOF")
                return
            reader.feed(data, fds)
            self._serve_buffered()

    def _serve_buffered(self) -> None:
        """Handle every complete message buffered, unless a stop is pending."""
        conn, reader, session = self._conn, self._reader, self.session
        while self._conn is conn and session.pending is None:
            msg = reader.next()
            if msg is None:
                return
            replies = session.handle_message(msg)
            if session.pending is not None:
                self._wait_for(session)
                return
            self._done(msg, replies)

    def _done(self, msg: Message, replies: list[bytes]) -> None:
        self.messages += 1
        line = describe(msg, replies)
        if self.trace is not None:
            self.trace.append(line)
        log.log(self._trace_level, "vhost-user %s: < %s", self.path, line)
        for reply in replies:
            self._send(reply)

    def _wait_for(self, session: Session) -> None:
        """Finish the held message when the device resolves its Deferred, then go on."""
        def resolved(value: int) -> None:
            if self.session is not session:           # that front-end is gone
                return

            def finish():
                msg, replies = session.resume(value)
                if session.pending is not None:
                    self._wait_for(session)
                    return
                self._done(msg, replies)
                self._serve_buffered()
            self._guard(finish)
        session.pending.add_done_callback(resolved)

    def _send(self, data: bytes) -> None:
        try:
            sent = self._conn.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except (ConnectionResetError, BrokenPipeError):
            sent = len(data)          # the EOF or reset shows up on the next read
        if sent != len(data):
            raise ProtocolError("the front-end does not read its replies (socket full)")

    def _disconnect(self, why: str) -> None:
        log.info("vhost-user %s: front-end disconnected (%s)", self.path, why)
        self._drop()

    def _drop(self) -> None:
        """End the current connection: tell the device once, release everything."""
        conn, session, reader = self._conn, self.session, self._reader
        if conn is None:
            return
        self._conn = self.session = self._reader = None
        self._unwatch(conn.fileno())
        try:
            self.device.disconnected()
        except Exception:
            log.exception("vhost-user %s: device.disconnected failed", self.path)
        finally:
            session.close()
            reader.close()
            conn.close()

    # -- life cycle

    def close(self) -> None:
        """Drop the front-end (the device hears ``disconnected``), stop listening, remove the
        socket file."""
        self._drop()
        if self._listen is not None:
            self._unwatch(self._listen.fileno())
            self._listen.close()
            self._listen = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self.detach()

    def __enter__(self) -> "VhostUserServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def serve_forever(self, timeout_s: Optional[float] = None,
                      tick: Optional[Callable[[], None]] = None) -> None:
        """Serve until :meth:`stop` (or KeyboardInterrupt). ``tick`` (if any) is called after
        every wait of at most ``timeout_s`` seconds (None: wait for an event)."""
        reactor = Reactor()
        self.attach(reactor)
        self._running = True
        try:
            while self._running:
                reactor.poll(timeout_s)
                if tick is not None:
                    tick()
        finally:
            self.detach()
            reactor.close()

    def stop(self) -> None:
        """Make :meth:`serve_forever` return after its current wait."""
        self._running = False


# ---- a small reactor --------------------------------------------------------------------------


class Reactor:
    """A ``selectors`` loop: ``register(fd, callback)``, ``unregister(fd)``, ``poll(timeout)``.

    Callbacks take no argument and run from :meth:`poll`. One callback per fd; registering an
    fd again replaces its callback. Unregister an fd before closing it. A callback that
    unregisters another fd whose event is in the same batch prevents that fd's callback."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._callbacks: dict[int, Callable[[], None]] = {}

    def register(self, fd: int, callback: Callable[[], None]) -> None:
        if fd in self._callbacks:
            self._selector.modify(fd, selectors.EVENT_READ, callback)
        else:
            self._selector.register(fd, selectors.EVENT_READ, callback)
        self._callbacks[fd] = callback

    def unregister(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            try:
                self._selector.unregister(fd)
            except (KeyError, ValueError, OSError):
                pass

    def poll(self, timeout_s: Optional[float] = 0.0) -> bool:
        """Wait up to ``timeout_s`` seconds (0: not at all, None: until something happens) and
        run the callbacks of the fds that are readable. True if any ran."""
        if not self._callbacks:
            if timeout_s:
                time.sleep(timeout_s)
            return False
        try:
            events = self._selector.select(timeout_s)
        except InterruptedError:
            return False
        ran = False
        for key, _ in events:
            callback = key.data
            if self._callbacks.get(key.fd) is callback:
                callback()
                ran = True
        return ran

    def close(self) -> None:
        self._selector.close()
        self._callbacks.clear()


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError as e:
        if e.errno != errno.EBADF:
            raise
