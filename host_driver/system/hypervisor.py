"""A hypervisor model on top of the offcard driver: the host OS's native path, and guest VMs
whose virtio-net front-ends drive the card's functions.

* The **host native path** uses the PF's own DMA descriptor ring (:mod:`host_driver.dma`): no
  virtio interface device is involved (the PF's virtio registers are never touched by it).
* A **direct** guest's front-end reaches its VF's registers straight through the VF BAR
  (doorbells go to the card; :attr:`Guest.traps` stays 0).
* A **trapped** guest's register accesses exit to the hypervisor, whose emulator forwards each
  one to the card (:class:`host_driver.virtio.TrappedAccess`; every access counted, each costing
  ``exit_ns`` of simulated time).

In both modes the hypervisor programs each VF's MSI-X table for the guest (as VFIO does), so
those writes are not guest traps.

The virtqueues and buffers live in memory that host and guest share. Without an IOMMU the
guest hands the card bus addresses; with one (``Hypervisor(..., iommu=...)``) each of a guest's
VFs gets a domain and the guest's memory is I/O virtual (:class:`host_driver.virtio.DomainMemory`):
the card translates every address and cannot reach anything else.
"""

from dataclasses import dataclass, field

from ..dma import DmaQueue
from ..offcard import OffcardDriver, OffcardFunction
from ..virtio import VirtioNetDriver, DirectAccess, TrappedAccess, HostMemory, DomainMemory

__all__ = ["Hypervisor", "Guest", "HostNative", "MODES"]

MODES = ("direct", "trap")


@dataclass
class Guest:
    """A VM with one virtio-net device per VF given to it."""
    name: str
    mode: str
    nics: list[VirtioNetDriver] = field(default_factory=list)

    @property
    def traps(self) -> int:
        return sum(n.access.traps for n in self.nics)


class HostNative:
    """The host OS's own use of the card: the PF's DMA ring, no virtio device."""

    def __init__(self, pf: OffcardFunction):
        self.pf = pf
        self.queue: DmaQueue | None = None

    async def start(self, entries=16):
        self.queue = await DmaQueue(self.pf, entries=entries).setup()
        return self

    async def copy_through_card(self, src: int, dst: int, length: int, card: int = 0):
        """host ``src`` -> card memory -> host ``dst``, through the PF's DMA ring."""
        await self.queue.transfer(src, card, length, to_host=False)
        await self.queue.transfer(dst, card, length, to_host=True)


class Hypervisor:
    def __init__(self, driver: OffcardDriver, exit_ns: int = 2_000, iommu=None,
                 guest_pages: int = 256):
        self.driver = driver
        self.iommu = iommu                           # host_driver.iommu.Iommu, or None
        self.guest_pages = guest_pages               # IOVA space per VF with an IOMMU
        self.t = driver.t
        self.exit_ns = exit_ns
        self.guests: dict[str, Guest] = {}
        self.assigned: dict[int, str] = {}          # VF index -> guest name
        self.native: HostNative | None = None

    async def start_host_native(self) -> HostNative:
        self.native = await HostNative(self.driver.pf).start()
        return self.native

    async def create_guest(self, name: str, vfs: list[OffcardFunction], mode: str = "direct",
                           queue_size: int = 64) -> Guest:
        """Start guest ``name`` with a virtio-net front-end on each of ``vfs``."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if name in self.guests:
            raise ValueError(f"guest {name!r} exists")
        for vf in vfs:
            if not vf.is_vf:
                raise ValueError(f"{vf} is the PF: guests get VFs")
            if vf.index in self.assigned:
                raise ValueError(f"VF{vf.index} is assigned to {self.assigned[vf.index]!r}")
        guest = Guest(name, mode)
        vm = len(self.guests) + 1
        for vf in vfs:
            access = TrappedAccess(vf, self.exit_ns) if mode == "trap" else DirectAccess(vf)
            if self.iommu is None:
                mem = HostMemory(self.t)
            else:
                dom = await self.iommu.attach(vf.index, vm=vm, pages=self.guest_pages)
                mem = DomainMemory(dom, 0, self.guest_pages << 12)
            nic = VirtioNetDriver(access, vf, mem, queue_size=queue_size)
            await nic.probe()
            await nic.bring_up()
            guest.nics.append(nic)
            self.assigned[vf.index] = name
        self.guests[name] = guest
        return guest

    async def destroy_guest(self, name: str) -> None:
        guest = self.guests.pop(name)
        for nic in guest.nics:
            await nic.reset()
            self.assigned.pop(nic.fn.index, None)
            if self.iommu is not None:
                await self.iommu.detach(nic.fn.index)
