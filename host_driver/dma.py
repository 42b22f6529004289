"""Host side of the card's DMA descriptor queues (see :mod:`hdl.dma.queue`)."""

from regmap import DESCRIPTOR, DmaRegs, DescStatus

from .offcard import OffcardFunction

__all__ = ["DmaQueue", "DescStatus", "DmaError"]


class DmaError(Exception):
    pass


_STATUS_OFFSET = DESCRIPTOR.byte_offset("status")
_STATUS_BYTES = DESCRIPTOR["status"].width // 8


def _descriptor(host, card, length, to_host, irq=False):
    """A fresh descriptor's bytes: ``status`` 0, for the card to write back."""
    return DESCRIPTOR.pack(host=host, card=card, length=length, to_host=bool(to_host),
                           irq=bool(irq))


class DmaQueue:
    """One function's descriptor ring: host memory for the ring, doorbell by MMIO.

    The descriptors are :data:`regmap.DESCRIPTOR` records, packed and read through that table."""

    def __init__(self, fn: OffcardFunction, entries=64, irq_vector=None):
        if entries & (entries - 1) or not 1 <= entries <= 256:
            raise ValueError(f"entries must be a power of two in 1..256, got {entries}")
        self.fn = fn
        self.t = fn.t
        self.entries = entries
        self.irq_vector = irq_vector
        self.prod = 0
        self.ring = None

    async def setup(self):
        raw = self.t.alloc_host_mem(self.entries * DESCRIPTOR.size + 64)
        self.ring = (raw + 63) & ~63
        await self.t.host_write(self.ring, bytes(self.entries * DESCRIPTOR.size))
        await self.fn.reg_write(DmaRegs.CTRL, 0)
        await self.fn.reg_write(DmaRegs.RING_LO, self.ring & 0xFFFF_FFFF)
        await self.fn.reg_write(DmaRegs.RING_HI, self.ring >> 32)
        await self.fn.reg_write(DmaRegs.RING_LOG2, self.entries.bit_length() - 1)
        vec = self.irq_vector or 0
        await self.fn.reg_write(DmaRegs.CTRL, 1 | (vec << 8))
        self.prod = 0
        return self

    def desc_addr(self, index):
        return self.ring + (index % self.entries) * DESCRIPTOR.size

    async def post(self, host, card, length, to_host, irq=False):
        """Write a descriptor and ring the doorbell; returns its index."""
        idx = self.prod
        await self.t.host_write(self.desc_addr(idx), _descriptor(host, card, length, to_host, irq))
        self.prod = (self.prod + 1) & 0xFFFF
        await self.fn.reg_write(DmaRegs.PROD, self.prod)
        return idx

    async def post_batch(self, descs):
        """Write descriptors ``(host, card, length, to_host)`` (at most the ring's size), then
        ring the doorbell once; returns their indices."""
        if len(descs) > self.entries:
            raise ValueError(f"{len(descs)} descriptors for a ring of {self.entries}")
        idxs = []
        for host, card, length, to_host in descs:
            idxs.append(self.prod)
            await self.t.host_write(self.desc_addr(self.prod),
                                    _descriptor(host, card, length, to_host))
            self.prod = (self.prod + 1) & 0xFFFF
        await self.fn.reg_write(DmaRegs.PROD, self.prod)
        return idxs

    async def status(self, index):
        """The descriptor's ``status`` field (0 until the card has finished it)."""
        raw = await self.t.host_read(self.desc_addr(index) + _STATUS_OFFSET, _STATUS_BYTES)
        return int.from_bytes(raw, "little")

    async def wait(self, index, timeout_ns=2_000_000, poll_ns=500):
        """Wait until the card wrote the descriptor's status; returns it. Reads the status
        again whenever the transport says the card wrote it (or every ``poll_ns`` where the
        transport cannot tell)."""
        deadline = self.t.now_ns() + timeout_ns
        addr = self.desc_addr(index) + _STATUS_OFFSET
        while True:
            st = await self.status(index)
            if st:
                return st
            left = deadline - self.t.now_ns()
            if left <= 0:
                raise TimeoutError(f"{self.fn}: descriptor {index} not done after {timeout_ns} ns")
            await self.t.wait_host_write(addr, _STATUS_BYTES, max(1, int(left)), poll_ns)

    async def transfer(self, host, card, length, to_host, timeout_ns=2_000_000):
        idx = await self.post(host, card, length, to_host)
        st = await self.wait(idx, timeout_ns)
        if st != DescStatus.DONE:
            raise DmaError(f"{self.fn}: descriptor {idx} status {st:#010x}")
        return st

    async def consumed(self):
        return await self.fn.reg_read(DmaRegs.CONS)
