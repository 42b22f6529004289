"""VF save / restore: the *modified fast save* and the *fast restore* of a directly assigned VF.

The guest keeps running throughout. The save never unassigns the VF and never drops the
VPCI bus connection; it only moves the guest's traffic off the VF for the time the VF's
device state is being read or written:

save (:meth:`VfSaveRestore.save`), in this order

1. ``switch_to_synthetic``   -- clear the VF data-path flag, offload weight 0: the guest's
   frames now take the synthetic adapter (a software path through the host's VM switch);
2. ``quiesce_vf``            -- stop the VF's queues fetching and wait until it is idle;
3. ``export_vf_state``       -- read the VF's device state (an opaque blob);
4. ``vsp_save``              -- the VSP writes the VF record (state, VF ID, LUID) to the
   runtime repository as versioned blocks (format below);
5. ``vmswitch_save_synthetic`` -- the VM switch saves the synthetic adapter, which from now on
   holds the frames the guest sends in its ring (delivered, not lost, when it resumes).

restore (:meth:`VfSaveRestore.restore`), in this order

1. ``power_on_restore_reads`` -- read both records and validate them completely, and check
   them against the VM and the host's VFs. Any :class:`RestoreError` is raised here, before
   a single :class:`VfStateAccess` call or VM change: a refused restore leaves card and VM as
   they were;
2. ``create_bus_interface``, ``allocate_vf``, ``assign_vf`` (by VF ID and LUID) -- or, when
   the VM still holds that very VF assigned (same ID, same LUID), ``skip_create_assign``;
3. ``connect_vpci``;
4. ``restore_state`` (import the blob) and ``resume_vf``;
5. ``set_flags_weight``       -- set the VF data-path flag and a non-zero offload weight: the
   guest's traffic goes back to the VF;
6. ``resume_synthetic``       -- the synthetic adapter resumes and delivers what it held.

Record format (:func:`pack` / :func:`unpack`), all little-endian. A record is a sequence of
blocks; each block is a 12-byte block header followed by ``length`` payload bytes::

    block header  u16 type, u16 reserved (0), u32 length, u32 CRC-32 of the payload (zlib)

    type 1  HEADER        4s magic b"OCVF", u32 VDEV version, u32 block count (all blocks,
                          this one included). Always the first block.
    type 2  VF_INFO       u16 VF index, u16 routing ID, u16 vendor ID, u16 device ID, u64 LUID.
                          Exactly one.
    type 3  DEVICE_STATE  u16 chunk number (0, 1, ... in order), then up to ``chunk`` bytes of
                          the device-state blob. At least one (an empty blob is one empty chunk).

Nothing here imports cocotb; the card is reached only through :class:`VfStateAccess`.
"""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum, IntEnum, IntFlag
from typing import Callable, Mapping, Protocol

from ..offcard import VENDOR_ID, VF_DEVICE_ID

__all__ = [
    "VfHandle", "VfRef", "VfStateAccess", "RestoreError", "SaveError", "BlockType", "SavedVf",
    "pack", "unpack", "split", "join", "header_payload", "RuntimeRepository", "Delivery", "FrameLedger", "SyntheticAdapter",
    "VfAssignment", "VmFlags", "AssignedVm", "HostVf", "VfSaveRestore",
    "VDEV_VERSION", "RECORD_MAGIC", "DEFAULT_CHUNK", "VF_DEVICE_ID", "SAVE_STEPS",
    "RESTORE_STEPS", "SKIP_STEPS",
]

VDEV_VERSION = 1
RECORD_MAGIC = b"OCVF"
DEFAULT_CHUNK = 4096

SAVE_STEPS = ("switch_to_synthetic", "quiesce_vf", "export_vf_state", "vsp_save",
              "vmswitch_save_synthetic")
RESTORE_STEPS = ("power_on_restore_reads", "create_bus_interface", "allocate_vf", "assign_vf",
                 "connect_vpci", "restore_state", "resume_vf", "set_flags_weight",
                 "resume_synthetic")
SKIP_STEPS = ("power_on_restore_reads", "skip_create_assign", "connect_vpci", "restore_state",
              "resume_vf", "set_flags_weight", "resume_synthetic")


# ---- the card-side contract ----------------------------------------------------------------

class VfHandle(Protocol):
    """What the host knows of a VF: its function index and its routing ID.
    :class:`host_driver.offcard.OffcardFunction` is one."""
    index: int
    rid: int


@dataclass(frozen=True)
class VfRef:
    """A bare :class:`VfHandle` for models and tests."""
    index: int
    rid: int


class VfStateAccess(Protocol):
    """The card's per-VF state export (:class:`host_driver.vf_state.CardVfState` on the card).

    * ``quiesce(vf)``: stop the VF's queues fetching new work, return once the card holds none
      of its work in flight. Idempotent.
    * ``export_state(vf) -> bytes``: the device state of a quiesced VF, opaque to the host.
    * ``import_state(vf, blob)``: write a state exported from a VF of the same type into
      ``vf``, stopping it first if it runs; the VF stays stopped. It checks the blob itself
      and raises, writing nothing, on one it cannot take.
    * ``resume(vf)``: let the VF fetch again, from the state it holds.

    Each raises on failure; none is called by a restore that the record or the VM refuses.
    """

    async def quiesce(self, vf: VfHandle) -> None: ...
    async def export_state(self, vf: VfHandle) -> bytes: ...
    async def import_state(self, vf: VfHandle, blob: bytes) -> None: ...
    async def resume(self, vf: VfHandle) -> None: ...


# ---- the record --------------------------------------------------------------------------

class RestoreError(Exception):
    """A record, or the VM it is restored into, refuses the restore (one-line message)."""


class SaveError(Exception):
    """The VM is not in a state the modified fast save accepts."""


class BlockType(IntEnum):
    HEADER = 1
    VF_INFO = 2
    DEVICE_STATE = 3


_BLOCK = struct.Struct("<HHII")        # type, reserved, payload length, CRC-32
_HEADER = struct.Struct("<4sII")       # magic, VDEV version, block count
_VF_INFO = struct.Struct("<HHHHQ")     # VF index, routing ID, vendor ID, device ID, LUID
_CHUNK_NO = struct.Struct("<H")


@dataclass(frozen=True)
class SavedVf:
    """The contents of a VF record."""
    vf_index: int
    rid: int
    luid: int
    state: bytes
    vendor_id: int = VENDOR_ID
    device_id: int = VF_DEVICE_ID
    vdev_version: int = VDEV_VERSION


def _block(kind: BlockType, payload: bytes) -> bytes:
    return _BLOCK.pack(kind, 0, len(payload), zlib.crc32(payload)) + payload


def pack(saved: SavedVf, chunk: int = DEFAULT_CHUNK) -> bytes:
    """Serialise ``saved`` as a record; the device state is cut into ``chunk``-byte blocks."""
    if not 0 < chunk:
        raise ValueError(f"chunk must be positive, got {chunk}")
    pieces = [saved.state[o:o + chunk] for o in range(0, len(saved.state), chunk)] or [b""]
    if len(pieces) > 0xFFFF:
        raise ValueError(f"{len(pieces)} state chunks, at most 65535: use a larger chunk")
    body = [_block(BlockType.VF_INFO, _VF_INFO.pack(saved.vf_index, saved.rid, saved.vendor_id,
                                                    saved.device_id, saved.luid))]
    body += [_block(BlockType.DEVICE_STATE, _CHUNK_NO.pack(n) + p) for n, p in enumerate(pieces)]
    head = _block(BlockType.HEADER, _HEADER.pack(RECORD_MAGIC, saved.vdev_version, 1 + len(body)))
    return head + b"".join(body)


def _blocks(data: bytes):
    """Yield ``(type, payload)`` for each block; raise on a cut block or a bad CRC."""
    off = k = 0
    while off < len(data):
        if len(data) - off < _BLOCK.size:
            raise RestoreError(f"truncated record: block {k} header at byte {off} is cut "
                               f"({len(data) - off} of {_BLOCK.size} bytes)")
        kind, reserved, length, crc = _BLOCK.unpack_from(data, off)
        if reserved:
            raise RestoreError(f"reserved field of block {k} is {reserved}, expected 0")
        off += _BLOCK.size
        if len(data) - off < length:
            raise RestoreError(f"truncated record: block {k} (type {kind}) needs {length} "
                               f"payload bytes, {len(data) - off} left")
        payload = data[off:off + length]
        off += length
        if zlib.crc32(payload) != crc:
            raise RestoreError(f"bad CRC in block {k} (type {kind}): stored {crc:#010x}, "
                               f"computed {zlib.crc32(payload):#010x}")
        yield kind, payload
        k += 1


def split(record: bytes) -> list[tuple[int, bytes]]:
    """A record's blocks as ``(type, payload)``, lengths and CRCs checked, nothing interpreted
    (with :func:`join`, for tools and tests that inspect or alter records)."""
    return list(_blocks(record))


def join(blocks) -> bytes:
    """``(type, payload)`` blocks back into a record, each with a fresh CRC."""
    return b"".join(_block(kind, payload) for kind, payload in blocks)


def header_payload(version: int, count: int) -> bytes:
    """The payload of a header block: magic, VDEV ``version``, ``count`` blocks in all."""
    return _HEADER.pack(RECORD_MAGIC, version, count)


def unpack(data: bytes, version: int = VDEV_VERSION) -> SavedVf:
    """Parse and check a record completely; raise :class:`RestoreError` on any defect."""
    blocks = _blocks(data)
    first = next(blocks, None)
    if first is None:
        raise RestoreError("truncated record: empty")
    kind, payload = first
    if kind != BlockType.HEADER or len(payload) != _HEADER.size:
        raise RestoreError(f"not a VF record: first block is type {kind} of {len(payload)} "
                           f"bytes, expected a {_HEADER.size}-byte header block")
    magic, vdev, count = _HEADER.unpack(payload)
    if magic != RECORD_MAGIC:
        raise RestoreError(f"not a VF record: magic {magic!r}, expected {RECORD_MAGIC!r}")
    if vdev != version:
        raise RestoreError(f"VDEV version {vdev} in the record, this host restores {version}")
    rest = list(blocks)
    if 1 + len(rest) != count:
        raise RestoreError(f"block count mismatch: header says {count}, "
                           f"record holds {1 + len(rest)}")
    info, chunks = None, []
    for k, (kind, payload) in enumerate(rest, start=1):
        if kind == BlockType.VF_INFO:
            if info is not None:
                raise RestoreError(f"second VF-info block (block {k})")
            if len(payload) != _VF_INFO.size:
                raise RestoreError(f"VF-info block of {len(payload)} bytes, "
                                   f"expected {_VF_INFO.size}")
            info = _VF_INFO.unpack(payload)
        elif kind == BlockType.DEVICE_STATE:
            if len(payload) < _CHUNK_NO.size:
                raise RestoreError(f"device-state block {k} of {len(payload)} bytes has no "
                                   f"chunk number")
            (n,) = _CHUNK_NO.unpack_from(payload)
            if n != len(chunks):
                raise RestoreError(f"device-state chunk {n} where chunk {len(chunks)} belongs")
            chunks.append(payload[_CHUNK_NO.size:])
        else:
            raise RestoreError(f"unknown block type {kind} (block {k})")
    if info is None:
        raise RestoreError("missing VF-info block")
    if not chunks:
        raise RestoreError("missing device-state block")
    vf_index, rid, vendor, device, luid = info
    return SavedVf(vf_index, rid, luid, b"".join(chunks), vendor, device, vdev)


class RuntimeRepository:
    """The host's runtime repository: named records (bytes) that outlive the VM's runtime.
    An in-memory model; the records are the :func:`pack` format."""

    def __init__(self) -> None:
        self._records: dict[str, bytes] = {}

    def put(self, name: str, record: bytes) -> None:
        self._records[name] = bytes(record)

    def get(self, name: str) -> bytes:
        try:
            return self._records[name]
        except KeyError:
            raise RestoreError(f"no record {name!r} in the runtime repository") from None

    def remove(self, name: str) -> None:
        self._records.pop(name, None)

    def __contains__(self, name: str) -> bool:
        return name in self._records

    def names(self) -> list[str]:
        return sorted(self._records)


# ---- frames ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Delivery:
    """One frame delivered: its number, the hops it took (last one delivered it), when."""
    seq: int
    hops: tuple[str, ...]
    t_us: float


class FrameLedger:
    """Every frame of one flow: sent, delivered (with its path) or dropped.

    ``now_us`` stamps deliveries. A frame is *lost* if it was sent and never delivered (a
    frame still held in a queue counts as lost until it comes out)."""

    def __init__(self, now_us: Callable[[], float] = lambda: 0.0) -> None:
        self.now_us = now_us
        self.sent: list[int] = []
        self.deliveries: list[Delivery] = []
        self.dropped: list[tuple[int, str]] = []

    def send(self, seq: int) -> None:
        self.sent.append(seq)

    def deliver(self, seq: int, hops: tuple[str, ...]) -> None:
        self.deliveries.append(Delivery(seq, hops, self.now_us()))

    def drop(self, seq: int, where: str) -> None:
        self.dropped.append((seq, where))

    @property
    def lost(self) -> list[int]:
        return sorted(set(self.sent) - {d.seq for d in self.deliveries})

    @property
    def duplicated(self) -> list[int]:
        return sorted(seq for seq, n in Counter(d.seq for d in self.deliveries).items() if n > 1)

    def paths(self, start: int = 0) -> set[tuple[str, ...]]:
        """The distinct paths of the deliveries from index ``start`` on."""
        return {d.hops for d in self.deliveries[start:]}


class SyntheticAdapter:
    """The VM switch's software NIC for one VM: carries the guest's frames through the host
    while the VF is not usable. Saved by the VM switch, it holds what the guest sends in its
    ring; :meth:`resume` delivers that in order."""

    _STATE = struct.Struct("<4sIQ")        # magic, version, frames carried
    MAGIC = b"SYNA"
    VERSION = 1

    def __init__(self, ledger: FrameLedger, hop: str = "synthetic") -> None:
        self.ledger = ledger
        self.hop = hop
        self.saved = False
        self.ring: list[int] = []
        self.carried = 0

    def send(self, seq: int) -> None:
        if self.saved:
            self.ring.append(seq)
        else:
            self.carried += 1
            self.ledger.deliver(seq, (self.hop,))

    def save(self) -> bytes:
        """Stop delivering (hold frames) and return the adapter's saved state."""
        self.saved = True
        return self._STATE.pack(self.MAGIC, self.VERSION, self.carried)

    @classmethod
    def check(cls, blob: bytes) -> int:
        """Validate a saved state; return the frames it had carried."""
        if len(blob) != cls._STATE.size:
            raise RestoreError(f"synthetic-adapter record of {len(blob)} bytes, "
                               f"expected {cls._STATE.size}")
        magic, version, carried = cls._STATE.unpack(blob)
        if magic != cls.MAGIC or version != cls.VERSION:
            raise RestoreError(f"synthetic-adapter record {magic!r} v{version}, "
                               f"expected {cls.MAGIC!r} v{cls.VERSION}")
        return carried

    def resume(self) -> None:
        self.saved = False
        held, self.ring = self.ring, []
        for seq in held:
            self.send(seq)


# ---- the VM ----------------------------------------------------------------------------

class VfAssignment(Enum):
    """The hypervisor's hold on the VF for this VM."""
    NONE = "none"
    ALLOCATED = "allocated"
    ASSIGNED = "assigned"


class VmFlags(IntFlag):
    NONE = 0
    VF_DATAPATH = 1            # the guest's traffic uses the VF (with a non-zero offload weight)


@dataclass(eq=False)
class AssignedVm:
    """A running guest with (possibly) a VF directly assigned, next to its synthetic adapter.

    :meth:`send` is the guest transmitting frame ``seq``: it goes through the VF when the VF
    data-path flag is set and the offload weight is non-zero, else through the synthetic
    adapter. A frame that meets a stopped VF is dropped (recorded in the ledger), so an
    ordering mistake (quiescing before switching) shows up as loss. ``vf_port``, if given,
    sees each frame that the VF carries (a model of the card's data path).
    """
    name: str
    ledger: FrameLedger
    vf: VfHandle | None = None
    luid: int = 0
    bus_interface: bool = False
    vpci_connected: bool = False
    flags: VmFlags = VmFlags.NONE
    offload_weight: int = 0
    vf_running: bool = False
    vf_port: Callable[[int], None] | None = None
    synthetic: SyntheticAdapter = field(init=False)
    assignment_log: list[VfAssignment] = field(default_factory=list)
    _assignment: VfAssignment = field(default=VfAssignment.NONE, init=False, repr=False)

    def __post_init__(self) -> None:
        self.synthetic = SyntheticAdapter(self.ledger)
        self.assignment_log.append(self._assignment)

    @classmethod
    def direct(cls, name: str, vf: VfHandle, luid: int, ledger: FrameLedger,
               offload_weight: int = 100, vf_port: Callable[[int], None] | None = None
               ) -> AssignedVm:
        """A VM running with ``vf`` assigned, connected and carrying its traffic."""
        vm = cls(name, ledger, vf, luid, bus_interface=True, vpci_connected=True,
                 flags=VmFlags.VF_DATAPATH, offload_weight=offload_weight, vf_running=True,
                 vf_port=vf_port)
        vm._assignment = VfAssignment.ASSIGNED
        vm.assignment_log[:] = [VfAssignment.ASSIGNED]
        return vm

    @property
    def assignment(self) -> VfAssignment:
        return self._assignment

    @assignment.setter
    def assignment(self, value: VfAssignment) -> None:
        self._assignment = value
        self.assignment_log.append(value)

    @property
    def on_vf(self) -> bool:
        return bool(self.flags & VmFlags.VF_DATAPATH) and self.offload_weight > 0

    def holds(self, vf_index: int, luid: int) -> bool:
        """The VF (by ID and LUID) is assigned to this VM behind a live bus interface."""
        return (self.assignment is VfAssignment.ASSIGNED and self.bus_interface
                and self.vf is not None and self.vf.index == vf_index and self.luid == luid)

    def send(self, seq: int) -> None:
        self.ledger.send(seq)
        if not self.on_vf:
            self.synthetic.send(seq)
        elif not self.vf_running:
            self.ledger.drop(seq, "stopped VF")
        else:
            if self.vf_port is not None:
                self.vf_port(seq)
            self.ledger.deliver(seq, ("vf",))


@dataclass(frozen=True)
class HostVf:
    """A VF the host can hand out by ID, with the LUID it carries."""
    handle: VfHandle
    luid: int


# ---- save and restore ------------------------------------------------------------------

class VfSaveRestore:
    """The modified fast save and the fast restore (module docstring) of one host.

    ``host_vfs`` maps VF index to :class:`HostVf` for restores into a VM that holds no VF yet.
    ``steps`` is every step done, in order, across calls; each call also returns its own.
    """

    def __init__(self, access: VfStateAccess, repo: RuntimeRepository,
                 host_vfs: Mapping[int, HostVf] | None = None, *,
                 vendor_id: int = VENDOR_ID, device_id: int = VF_DEVICE_ID,
                 version: int = VDEV_VERSION, chunk: int = DEFAULT_CHUNK,
                 offload_weight: int = 100) -> None:
        if offload_weight <= 0:
            raise ValueError(f"the restored offload weight must be non-zero, got {offload_weight}")
        self.access = access
        self.repo = repo
        self.host_vfs = dict(host_vfs or {})
        self.vendor_id = vendor_id
        self.device_id = device_id
        self.version = version
        self.chunk = chunk
        self.offload_weight = offload_weight
        self.steps: list[str] = []

    @staticmethod
    def record_names(vm_name: str) -> tuple[str, str]:
        """Repository names of the VF record (VSP) and the synthetic-adapter record (VM switch)."""
        return f"{vm_name}/vf", f"{vm_name}/synthetic"

    def _step(self, done: list[str], name: str) -> None:
        done.append(name)
        self.steps.append(name)

    async def save(self, vm: AssignedVm) -> list[str]:
        """Modified fast save of ``vm``'s VF; the VF stays assigned and connected. If the card
        fails after the quiesce, the VF is resumed and put back on the data path."""
        if not (vm.assignment is VfAssignment.ASSIGNED and vm.vpci_connected and vm.vf):
            raise SaveError(f"{vm.name}: no assigned, connected VF to save "
                            f"({vm.assignment.value}, vpci {vm.vpci_connected})")
        vf_name, syn_name = self.record_names(vm.name)
        done: list[str] = []
        flags, weight = vm.flags, vm.offload_weight
        self._step(done, "switch_to_synthetic")
        vm.flags &= ~VmFlags.VF_DATAPATH
        vm.offload_weight = 0
        try:
            self._step(done, "quiesce_vf")
            vm.vf_running = False                      # fetching stops as the quiesce starts
            await self.access.quiesce(vm.vf)
            self._step(done, "export_vf_state")
            blob = await self.access.export_state(vm.vf)
        except Exception:
            if "quiesce_vf" in done:
                await self.access.resume(vm.vf)
                vm.vf_running = True
            vm.flags, vm.offload_weight = flags, weight
            raise
        self._step(done, "vsp_save")
        self.repo.put(vf_name, pack(SavedVf(vm.vf.index, vm.vf.rid, vm.luid, blob,
                                            self.vendor_id, self.device_id, self.version),
                                    self.chunk))
        self._step(done, "vmswitch_save_synthetic")
        self.repo.put(syn_name, vm.synthetic.save())
        return done

    def _check(self, vm: AssignedVm, saved: SavedVf) -> tuple[VfHandle, bool]:
        """The VF to restore into and whether the VM already holds it (the skip path)."""
        if (saved.vendor_id, saved.device_id) != (self.vendor_id, self.device_id):
            raise RestoreError(f"record is for a {saved.vendor_id:04x}:{saved.device_id:04x} VF, "
                               f"this host's are {self.vendor_id:04x}:{self.device_id:04x}")
        if vm.holds(saved.vf_index, saved.luid):
            vf = vm.vf
            skip = True
        elif vm.assignment is not VfAssignment.NONE:
            held = f"VF{vm.vf.index} LUID {vm.luid:#x}" if vm.vf else "a VF"
            raise RestoreError(f"{vm.name} holds {held} ({vm.assignment.value}); the record is "
                               f"for VF{saved.vf_index} LUID {saved.luid:#x}")
        else:
            host = self.host_vfs.get(saved.vf_index)
            if host is None:
                raise RestoreError(f"no VF{saved.vf_index} on this host")
            if host.luid != saved.luid:
                raise RestoreError(f"VF{saved.vf_index} has LUID {host.luid:#x}, "
                                   f"the record {saved.luid:#x}")
            vf = host.handle
            skip = False
        if vf.rid != saved.rid:
            raise RestoreError(f"VF{saved.vf_index} is at routing ID {vf.rid:#06x}, "
                               f"the record says {saved.rid:#06x}")
        return vf, skip

    async def restore(self, vm: AssignedVm) -> list[str]:
        """Fast restore of ``vm``'s VF from the repository, in the design's order.

        Everything is validated before the first change: a :class:`RestoreError` leaves the
        card (no :class:`VfStateAccess` call) and the VM untouched."""
        vf_name, syn_name = self.record_names(vm.name)
        done: list[str] = []
        self._step(done, "power_on_restore_reads")
        saved = unpack(self.repo.get(vf_name), self.version)
        SyntheticAdapter.check(self.repo.get(syn_name))
        vf, skip = self._check(vm, saved)
        if skip:
            self._step(done, "skip_create_assign")
        else:
            self._step(done, "create_bus_interface")
            vm.bus_interface = True
            self._step(done, "allocate_vf")
            vm.vf = vf
            vm.assignment = VfAssignment.ALLOCATED
            self._step(done, "assign_vf")
            vm.luid = saved.luid
            vm.assignment = VfAssignment.ASSIGNED
        self._step(done, "connect_vpci")
        vm.vpci_connected = True
        self._step(done, "restore_state")
        await self.access.import_state(vf, saved.state)
        self._step(done, "resume_vf")
        await self.access.resume(vf)
        vm.vf_running = True
        self._step(done, "set_flags_weight")
        vm.flags |= VmFlags.VF_DATAPATH
        vm.offload_weight = self.offload_weight
        self._step(done, "resume_synthetic")
        vm.synthetic.resume()
        return done
