"""The host's IOMMU for the card: per-function translation domains and the I/O page fault service.

Each card function gets a *domain*: a flat table of little-endian u64 page-table entries in
host memory, one per 4 KiB page of the function's I/O virtual address space, which the card
walks itself (:class:`regmap.IommuRegs`). Only the PF driver programs domains, through PF
BAR2.

Domains can be *overcommitted*: the VM behind a function is allowed a set of pages, only some
of which are backed by host memory (present). When the card touches an allowed page that is
not present it raises an I/O page fault (:class:`regmap.FaultRegs`); :class:`FaultService`
reads the fault from the IOPF ring, backs the page and tells the card to retry through the
completion queue (CQ). A fault on a page outside the allowed set is refused, and the card
finishes the descriptor with :attr:`regmap.DescStatus.FAULT`. IOVAs beyond the domain's
size never fault: the card blocks them itself.

Register offsets come from :mod:`regmap`, and the records in host memory (page-table
entries, FBQ / IOPF / CQ entries) are packed and parsed through its field tables
(:mod:`regmap.records`); nothing here imports the gateware or cocotb.
"""

from dataclasses import dataclass
from typing import Callable, NamedTuple

from regmap import (CQ_ENTRY, FBQ_ENTRY, IOPF_ENTRY, PTE, FaultRegs, IommuRegs,
                    PAGE_SHIFT)

from .offcard import OffcardDriver
from .transport import MsiVector, Transport

__all__ = ["IommuDomain", "Iommu", "FaultService", "Fault", "Resolution", "TranslationError",
           "PAGE_SIZE", "MAX_DOMAIN_PAGES", "MAPPED", "PRESENT", "REFUSED"]

PAGE_SIZE = 1 << PAGE_SHIFT
# The card clamps DOM_PAGES to this (4 GiB of IOVA per function); a larger domain would be
# silently cut short, so it is refused here.
MAX_DOMAIN_PAGES = IommuRegs.MAX_PAGES
MAX_RING_ENTRIES = 1 << 8        # FaultRegs *_LOG2: 0..8

# Decisions recorded in FaultService.log
MAPPED = "mapped"       # the page was backed now; the card retries
PRESENT = "present"     # the page was already present (backed meanwhile); the card retries
REFUSED = "refused"     # not allowed (or no domain); the card fails the descriptor


class TranslationError(Exception):
    """An IOVA has no present translation in a domain (host-side accesses only)."""


def _alloc_aligned(t: Transport, size: int, align: int) -> int:
    """Allocate ``size`` bytes of host memory starting on an ``align`` boundary."""
    raw = t.alloc_host_mem(size + align - 1)
    return (raw + align - 1) & ~(align - 1)


def _check_ring_entries(name: str, n: int) -> None:
    if n < 1 or n & (n - 1) or n > MAX_RING_ENTRIES:
        raise ValueError(f"{name} must be a power of two in 1..{MAX_RING_ENTRIES}, got {n}")


class IommuDomain:
    """The translation domain of card function ``fidx`` (0 = PF, n = VF n).

    ``pages`` IOVA pages; page table at bus address ``pt_base``. The page table in host memory
    is what the card sees; :attr:`present` (IOVA page number -> bus address of the backing
    page) mirrors it so that :meth:`translate` needs no host-memory access, and
    :attr:`allowed` is the set of IOVA page numbers the VM may use (present or not).

    Changing a present entry needs an ATC invalidation afterwards (:meth:`Iommu.unmap` does
    both); making a page present does not, since the card caches present translations only.
    """

    def __init__(self, t: Transport, fidx: int, vm: int, pages: int, pt_base: int):
        self.t = t
        self.fidx = fidx
        self.vm = vm
        self.pages = pages
        self.pt_base = pt_base
        self.present: dict[int, int] = {}
        self.allowed: set[int] = set()

    def __repr__(self):
        return (f"IommuDomain(fidx={self.fidx}, vm={self.vm}, pages={self.pages}, "
                f"pt_base={self.pt_base:#x}, present={len(self.present)}, "
                f"allowed={len(self.allowed)})")

    def _vpns(self, iova: int, length: int) -> range:
        """The IOVA page numbers that ``length`` bytes at ``iova`` touch (all in the domain)."""
        if length <= 0:
            raise ValueError(f"length must be positive, got {length}")
        if iova < 0 or iova + length > self.pages << PAGE_SHIFT:
            raise ValueError(f"IOVA range {iova:#x}+{length:#x} outside function {self.fidx}'s "
                             f"domain of {self.pages} pages")
        return range(iova >> PAGE_SHIFT, ((iova + length - 1) >> PAGE_SHIFT) + 1)

    def pte_addr(self, vpn: int) -> int:
        """Bus address of the page-table entry of IOVA page ``vpn``."""
        return self.pt_base + PTE.size * vpn

    def allow(self, iova: int, length: int) -> None:
        """Let the VM use the pages under ``iova``..``iova + length``; they fault in on first use."""
        self.allowed.update(self._vpns(iova, length))

    def is_allowed(self, iova: int) -> bool:
        return iova >> PAGE_SHIFT in self.allowed

    async def map(self, iova: int, length: int, bus: int | None = None) -> int:
        """Back the pages under ``iova``..``iova + length`` now and write their PTEs.

        The pages map to consecutive bus pages starting at ``bus`` (4 KiB aligned), or to fresh
        zeroed host memory when ``bus`` is None. The pages become allowed too. Pages already
        present are refused (unmap them first). Returns the bus address of the first page."""
        vpns = self._vpns(iova, length)
        busy = [v for v in vpns if v in self.present]
        if busy:
            raise ValueError(f"function {self.fidx}: IOVA page {busy[0]:#x} already mapped")
        size = len(vpns) << PAGE_SHIFT
        if bus is None:
            bus = _alloc_aligned(self.t, size, PAGE_SIZE)
            await self.t.host_write(bus, bytes(size))
        elif bus < 0 or bus & (PAGE_SIZE - 1) or bus + size > 1 << 64:
            raise ValueError(f"bus address {bus:#x} must be 4 KiB aligned and fit in 64 bits")
        first = bus >> PAGE_SHIFT
        ptes = b"".join(PTE.pack(present=1, page=first + k) for k in range(len(vpns)))
        await self.t.host_write(self.pte_addr(vpns.start), ptes)
        for k, v in enumerate(vpns):
            self.present[v] = bus + (k << PAGE_SHIFT)
        self.allowed.update(vpns)
        return bus

    async def unmap(self, iova: int, length: int) -> None:
        """Clear the PTEs under ``iova``..``iova + length``. The pages stay allowed (they fault
        back in on next use) and the caller must invalidate the card's ATC for this function.
        The backing host memory is not reused."""
        vpns = self._vpns(iova, length)
        await self.t.host_write(self.pte_addr(vpns.start), bytes(PTE.size * len(vpns)))
        for v in vpns:
            self.present.pop(v, None)

    def translate(self, iova: int) -> int | None:
        """Bus address of the byte at ``iova``, or None when its page is not present."""
        if iova < 0:
            return None
        page = self.present.get(iova >> PAGE_SHIFT)
        return None if page is None else page | (iova & (PAGE_SIZE - 1))

    def _pieces(self, iova: int, n: int):
        """(bus address, offset into the buffer, length) per page of ``n`` bytes at ``iova``."""
        done = 0
        while done < n:
            a = iova + done
            bus = self.translate(a)
            if bus is None:
                raise TranslationError(f"function {self.fidx}: IOVA {a:#x} not present")
            chunk = min(n - done, PAGE_SIZE - (a & (PAGE_SIZE - 1)))
            yield bus, done, chunk
            done += chunk

    async def read(self, iova: int, n: int) -> bytes:
        """Read ``n`` bytes at ``iova`` through the translation (what the VM sees)."""
        out = bytearray(n)
        for bus, off, chunk in self._pieces(iova, n):
            out[off:off + chunk] = await self.t.host_read(bus, chunk)
        return bytes(out)

    async def write(self, iova: int, data: bytes) -> None:
        """Write ``data`` at ``iova`` through the translation. Every page is checked first, so
        a missing page raises before anything is written."""
        pieces = list(self._pieces(iova, len(data)))
        for bus, off, chunk in pieces:
            await self.t.host_write(bus, bytes(data[off:off + chunk]))


class Iommu:
    """The card's translation domains, programmed through PF BAR2.

    :meth:`attach` and :meth:`detach` select a domain with ``DOM_SEL`` and then write it, so
    calls of the two must not overlap each other.
    """

    def __init__(self, driver: OffcardDriver):
        self.driver = driver
        self.t: Transport = driver.t
        self.domains: dict[int, IommuDomain] = {}

    async def num_functions(self) -> int:
        """Functions the card has (the PF and TotalVFs)."""
        return await self.driver.num_functions()

    def domain(self, fidx: int) -> IommuDomain:
        try:
            return self.domains[fidx]
        except KeyError:
            raise ValueError(f"function {fidx} has no domain attached") from None

    async def attach(self, fidx: int, vm: int, pages: int) -> IommuDomain:
        """Give function ``fidx`` a domain of ``pages`` IOVA pages for VM ``vm``, with nothing
        allowed or present yet. Allocates and zeroes the page table, then programs it; the
        domain goes live with the ``DOM_PAGES`` write, which comes last (after clearing it, in
        case the card still holds an old domain for the function)."""
        nf = await self.num_functions()
        if not 0 <= fidx < nf:
            raise ValueError(f"function index {fidx} out of range: the card has {nf} functions")
        if fidx in self.domains:
            raise ValueError(f"function {fidx} already attached")
        if not 0 <= vm <= 0xFF:
            raise ValueError(f"vm id must be 0..255, got {vm}")
        if not 0 < pages <= MAX_DOMAIN_PAGES:
            raise ValueError(f"pages must be 1..{MAX_DOMAIN_PAGES}, got {pages}")
        pt_size = (PTE.size * pages + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        pt = _alloc_aligned(self.t, pt_size, PAGE_SIZE)
        await self.t.host_write(pt, bytes(pt_size))
        w = self.driver.mgmt_write
        await w(IommuRegs.DOM_SEL, fidx)
        await w(IommuRegs.DOM_PAGES, 0)
        await w(IommuRegs.DOM_PT_LO, pt & 0xFFFF_FFFF)
        await w(IommuRegs.DOM_PT_HI, pt >> 32)
        await w(IommuRegs.DOM_VM, vm)
        await w(IommuRegs.DOM_PAGES, pages)
        dom = IommuDomain(self.t, fidx, vm, pages, pt)
        self.domains[fidx] = dom
        return dom

    async def detach(self, fidx: int) -> None:
        """Turn translation off for ``fidx`` (its IOVAs become bus addresses again) and drop
        its cached translations. The page table and backing pages are not reused."""
        self.domain(fidx)                        # raises if not attached
        await self.driver.mgmt_write(IommuRegs.DOM_SEL, fidx)
        await self.driver.mgmt_write(IommuRegs.DOM_PAGES, 0)
        await self.invalidate(fidx)
        del self.domains[fidx]

    async def invalidate(self, fidx: int | None = None) -> None:
        """Drop the card's cached translations of function ``fidx`` (None: of every function)."""
        await self.driver.mgmt_write(IommuRegs.ATC_INV, 1 << 31 if fidx is None else fidx & 0xFF)

    async def unmap(self, fidx: int, iova: int, length: int) -> None:
        """Clear the PTEs under ``iova``..``iova + length`` of ``fidx``, then invalidate its ATC
        entries so the card stops using the old pages."""
        await self.domain(fidx).unmap(iova, length)
        await self.invalidate(fidx)

    async def counters(self) -> dict[str, int]:
        """The device TLB's hit and miss (walk) counts and the segments blocked outside a domain."""
        r = self.driver.mgmt_read
        return {"atc_hits": await r(IommuRegs.ATC_HITS),
                "atc_misses": await r(IommuRegs.ATC_MISSES),
                "blocked": await r(IommuRegs.BLOCKED)}


@dataclass
class Fault:
    """One I/O page fault as read from the IOPF ring (and its FBQ entry, for a write).

    ``index`` is the free-running IOPF index (what the CQ entry names), ``seq`` the card's
    sequence number (``index + 1`` mod 2**16). For a write, ``buffer`` is the card address of
    the staged payload, ``length`` its size and ``slot`` the staging slot; all None for a read.
    ``seen_ns`` is when the host read the fault."""
    index: int
    seq: int
    fidx: int
    vm: int
    iova: int
    write: bool
    fbq_index: int | None
    buffer: int | None
    length: int | None
    slot: int | None
    seen_ns: float


class Resolution(NamedTuple):
    """A :class:`FaultService` log record: the fault, the decision and when the CQ doorbell rang."""
    fault: Fault
    decision: str
    time_ns: float


class _Ring:
    """A pinned ring of 16-byte entries in host memory."""

    def __init__(self, t: Transport, entries: int):
        self.entries = entries
        self.base = _alloc_aligned(t, entries * FaultRegs.ENTRY_SIZE, FaultRegs.ENTRY_SIZE)

    def addr(self, index: int) -> int:
        return self.base + (index & (self.entries - 1)) * FaultRegs.ENTRY_SIZE


class FaultService:
    """Reads I/O page faults from the card and resolves them against the domains of ``iommu``.

    ``entries`` sizes all three rings; ``fbq_entries``, ``iopf_entries`` and ``cq_entries``
    override it per ring (powers of two, at most 256). The rings are allocated once, by the
    first :meth:`setup`, and never released: the card may write them at any time.

    With :attr:`hold` set, :meth:`service_once` (and :meth:`run`) only collect faults into
    :attr:`pending`; the caller resolves them with :meth:`resolve`, or clears :attr:`hold`.
    :attr:`log` keeps a :class:`Resolution` per fault resolved.

    One task services the rings: :meth:`poll` and :meth:`resolve` keep the ring indices on
    the host side, so calls of them must not overlap.
    """

    def __init__(self, iommu: Iommu, entries: int = 16, fbq_entries: int | None = None,
                 iopf_entries: int | None = None, cq_entries: int | None = None):
        _check_ring_entries("entries", entries)
        self.fbq_entries = entries if fbq_entries is None else fbq_entries
        self.iopf_entries = entries if iopf_entries is None else iopf_entries
        self.cq_entries = entries if cq_entries is None else cq_entries
        _check_ring_entries("fbq_entries", self.fbq_entries)
        _check_ring_entries("iopf_entries", self.iopf_entries)
        _check_ring_entries("cq_entries", self.cq_entries)
        self.iommu = iommu
        self.driver = iommu.driver
        self.t: Transport = iommu.t
        self.fbq: _Ring | None = None
        self.iopf: _Ring | None = None
        self.cq: _Ring | None = None
        self.vector: MsiVector | None = None
        self.fbq_cons = 0
        self.iopf_cons = 0
        self.cq_prod = 0
        self.hold = False
        self.pending: list[Fault] = []
        self.log: list[Resolution] = []
        self._msi_seen = 0

    async def setup(self, vector_index: int = 0) -> None:
        """Allocate the rings (first call only), program them and enable the fault unit with the
        PF's MSI-X vector ``vector_index``, which is unmasked. The PF's MSI-X must be set up
        already (:meth:`OffcardFunction.setup_msix`). Re-running it resets every index."""
        pf = self.driver.pf
        if pf is None or not pf.msix_vectors:
            raise RuntimeError("the PF's MSI-X is not set up: call driver.pf.setup_msix() first")
        if not 0 <= vector_index < min(len(pf.msix_vectors), 32):
            raise ValueError(f"vector_index {vector_index} out of range: the PF has "
                             f"{len(pf.msix_vectors)} MSI-X vectors")
        if self.cq is None:
            self.fbq = _Ring(self.t, self.fbq_entries)
            self.iopf = _Ring(self.t, self.iopf_entries)
            self.cq = _Ring(self.t, self.cq_entries)
        w = self.driver.mgmt_write
        await w(FaultRegs.CTRL, 0)
        for ring, lo in ((self.fbq, FaultRegs.FBQ_LO), (self.iopf, FaultRegs.IOPF_LO),
                         (self.cq, FaultRegs.CQ_LO)):
            await self.t.host_write(ring.base, bytes(ring.entries * FaultRegs.ENTRY_SIZE))
            await w(lo, ring.base & 0xFFFF_FFFF)
            await w(lo + 4, ring.base >> 32)
            await w(lo + 8, ring.entries.bit_length() - 1)
        self.fbq_cons = self.iopf_cons = self.cq_prod = 0
        self.pending.clear()
        self.vector = pf.msix_vectors[vector_index]
        self._msi_seen = self.t.msi_count(self.vector)
        await pf.msix_mask(vector_index, False)
        await w(FaultRegs.CTRL, 1 | (vector_index << 8))

    def _check_setup(self) -> None:
        if self.cq is None:
            raise RuntimeError("FaultService.setup() has not run")

    async def poll(self) -> list[Fault]:
        """Read the faults the card has raised since the last poll, oldest first, and hand their
        IOPF (and FBQ) ring slots back to the card."""
        self._check_setup()
        prod = await self.driver.mgmt_read(FaultRegs.IOPF_PROD) & 0xFFFF
        faults = []
        fbq_read = 0
        while self.iopf_cons != prod:
            idx = self.iopf_cons
            e = IOPF_ENTRY.unpack(await self.t.host_read(self.iopf.addr(idx), IOPF_ENTRY.size))
            if e["seq"] != (idx + 1) & 0xFFFF:
                break                      # the entry has not landed yet: next poll
            fbq_index = buffer = length = slot = None
            if e["has_fbq"] and e["fbq_index"] != FaultRegs.NO_FBQ:
                fbq_index = e["fbq_index"]
                fbq = FBQ_ENTRY.unpack(await self.t.host_read(self.fbq.addr(fbq_index),
                                                              FBQ_ENTRY.size))
                buffer, length, slot = fbq["staging"], fbq["length"], fbq["slot"]
                fbq_read += 1
            faults.append(Fault(idx, e["seq"], e["function"], e["vm"], e["iova"],
                                bool(e["write"]), fbq_index, buffer, length, slot,
                                self.t.now_ns()))
            self.iopf_cons = (idx + 1) & 0xFFFF
        if fbq_read:
            self.fbq_cons = (self.fbq_cons + fbq_read) & 0xFFFF
            await self.driver.mgmt_write(FaultRegs.FBQ_CONS, self.fbq_cons)
        if faults:
            await self.driver.mgmt_write(FaultRegs.IOPF_CONS, self.iopf_cons)
        return faults

    async def resolve(self, fault: Fault, refuse: bool | None = None,
                      timeout_ns: int = 1_000_000, poll_ns: int = 500) -> str:
        """Answer ``fault`` with a CQ entry and the ``CQ_PROD`` doorbell; returns the decision.

        ``refuse`` None: back the page if the domain allows it (:data:`MAPPED`, or
        :data:`PRESENT` if it is backed already), else refuse (:data:`REFUSED`). True: refuse.
        False: allow and back the page whatever the allowed set says. A function without a
        domain, or an IOVA outside it, is always refused. When the CQ is full this waits for
        the card to take entries, up to ``timeout_ns`` (then TimeoutError)."""
        self._check_setup()
        dom = self.iommu.domains.get(fault.fidx)
        in_domain = dom is not None and 0 <= fault.iova < dom.pages << PAGE_SHIFT
        if not in_domain or refuse or (refuse is None and not dom.is_allowed(fault.iova)):
            decision = REFUSED
        elif dom.translate(fault.iova) is not None:
            decision = PRESENT
        else:
            await dom.map(fault.iova & ~(PAGE_SIZE - 1), PAGE_SIZE)
            decision = MAPPED
        status = FaultRegs.ST_REFUSED if decision == REFUSED else FaultRegs.ST_MAPPED
        await self._wait_cq_room(timeout_ns, poll_ns)
        await self.t.host_write(self.cq.addr(self.cq_prod),
                                CQ_ENTRY.pack(function=fault.fidx, status=status,
                                              iopf_index=fault.index & 0xFFFF_FFFF))
        self.cq_prod = (self.cq_prod + 1) & 0xFFFF
        await self.driver.mgmt_write(FaultRegs.CQ_PROD, self.cq_prod)
        self.pending = [f for f in self.pending if f is not fault]
        self.log.append(Resolution(fault, decision, self.t.now_ns()))
        return decision

    async def _wait_cq_room(self, timeout_ns: int, poll_ns: int) -> None:
        waited = 0
        while True:
            cons = await self.driver.mgmt_read(FaultRegs.CQ_CONS)
            if (self.cq_prod - cons) & 0xFFFF < self.cq_entries:
                return
            if waited >= timeout_ns:
                raise TimeoutError(f"fault CQ full ({self.cq_entries} entries) for {timeout_ns} ns")
            await self.t.sleep_ns(poll_ns)
            waited += poll_ns

    async def service_once(self) -> list[Fault]:
        """Poll, then (unless :attr:`hold`) resolve everything pending; returns the faults
        resolved."""
        self.pending.extend(await self.poll())
        if self.hold:
            return []
        done = list(self.pending)
        for fault in done:
            await self.resolve(fault)
        return done

    async def run(self, stop, timeout_ns: int = 10_000) -> None:
        """Service faults until ``stop`` says so: a predicate, or an event with ``is_set()``.

        Waits for the fault MSI-X for at most ``timeout_ns`` and services after every wake-up,
        interrupt or not, so a lost or masked interrupt delays a fault but cannot wedge it."""
        self._check_setup()
        done: Callable[[], bool] = stop.is_set if hasattr(stop, "is_set") else stop
        while not done():
            await self.t.wait_msi(self.vector, self._msi_seen + 1, timeout_ns)
            self._msi_seen = self.t.msi_count(self.vector)
            await self.service_once()

    async def counters(self) -> dict[str, int]:
        """Faults raised, the busy staging slots (bit mask) and the CQ entries the card ignored."""
        r = self.driver.mgmt_read
        return {"faults": await r(FaultRegs.FAULTS),
                "stage_busy": await r(FaultRegs.STAGE_BUSY),
                "cq_bad": await r(FaultRegs.CQ_BAD)}
