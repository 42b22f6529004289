"""The transport interface between the host driver and a card.

Everything the driver does to the card goes through these calls: configuration reads and
writes by routing ID, memory-mapped reads and writes, host memory, MSI vectors and time.
Implementations: :class:`cosim.host.RootComplexTransport` (simulation); a vfio one would
implement the same methods on a real machine.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

__all__ = ["Transport", "MsiVector", "CplError", "rid", "rid_str"]


class CplError(Exception):
    """A non-posted request came back with a status other than Successful Completion."""

    def __init__(self, what, status):
        super().__init__(f"{what}: completion status {status}")
        self.status = status


def rid(bus, dev, fn):
    return (bus << 8) | (dev << 3) | fn


def rid_str(r):
    return f"{r >> 8:02x}:{(r >> 3) & 0x1f:02x}.{r & 7}"


@dataclass
class MsiVector:
    addr: int
    data: int


class Transport(ABC):
    # ---- configuration space ----
    @abstractmethod
    async def cfg_read(self, rid: int, offset: int, size: int = 4) -> int:
        """Read ``size`` (1, 2 or 4) bytes; raises :class:`CplError` on UR/CA, TimeoutError."""

    @abstractmethod
    async def cfg_write(self, rid: int, offset: int, value: int, size: int = 4) -> None:
        """Write ``size`` bytes (byte enables from ``offset`` and ``size``); raises on UR/CA."""

    # ---- platform ----
    @abstractmethod
    async def enumerate(self) -> list[int]:
        """Platform enumeration (firmware/OS): returns routing IDs of the endpoints found,
        with their BARs assigned and the bridges' windows set."""

    @abstractmethod
    async def reserve_mmio(self, size: int, align: int, prefetchable: bool = True,
                           bus_num: int = 1) -> int:
        """Reserve address space below the device's upstream bridge and open the bridge's
        window over it (what the OS does for SR-IOV VF BARs). Returns the base address."""

    # ---- memory-mapped I/O ----
    @abstractmethod
    async def mmio_read(self, addr: int, size: int = 4) -> int: ...

    @abstractmethod
    async def mmio_write(self, addr: int, value: int, size: int = 4) -> None: ...

    # ---- host memory ----
    @abstractmethod
    def alloc_host_mem(self, size: int) -> int:
        """Allocate DMA-able host memory; returns its bus address."""

    @abstractmethod
    async def host_read(self, addr: int, length: int) -> bytes: ...

    @abstractmethod
    async def host_write(self, addr: int, data: bytes) -> None: ...

    # ---- interrupts ----
    @abstractmethod
    def alloc_msi_vectors(self, n: int) -> list[MsiVector]: ...

    @abstractmethod
    def msi_count(self, vector: MsiVector) -> int:
        """How many messages have arrived for ``vector``."""

    @abstractmethod
    async def wait_msi(self, vector: MsiVector, count: int, timeout_ns: int) -> bool:
        """Wait until ``msi_count(vector) >= count``; False on timeout."""

    async def wait_host_write(self, addr: int, length: int, timeout_ns: int,
                              poll_ns: int = 500) -> None:
        """Return once the device may have written host memory in ``[addr, addr + length)``,
        at the latest after ``timeout_ns``; the caller reads the memory again. This default
        sleeps ``min(timeout_ns, poll_ns)``; a transport that sees the device's writes returns
        at the first write into the range."""
        await self.sleep_ns(min(timeout_ns, poll_ns))

    # ---- time ----
    @abstractmethod
    async def sleep_ns(self, ns: int) -> None: ...

    @abstractmethod
    def now_ns(self) -> float: ...
