"""Dirty-page logging per function (:class:`regmap.DirtyLogRegs`), from the PF's driver.

The card marks every page it writes for a logged function in a bitmap in host memory (one bit
per 4 KiB page from ``first``, the byte of the page's bit set to ``0xFF``). A migration pass
harvests the bitmap: it reads and clears it as one step (on a real host an atomic exchange per
word; in the co-simulation nothing of the simulator runs between the read and the clear), so a
mark the card sends meanwhile lands in this harvest or the next one, never in between.
"""

from regmap import DirtyLogRegs as R

from .offcard import OffcardDriver

__all__ = ["DirtyLog", "PAGE"]

PAGE = 1 << R.PAGE_SHIFT


class DirtyLog:
    """The dirty logs of one card: ``start`` / ``harvest`` / ``stop`` per function."""

    def __init__(self, driver: OffcardDriver):
        self.driver = driver
        self.t = driver.t
        self.logs: dict[int, tuple[int, int, int]] = {}    # fidx -> (bitmap, first, pages)

    async def start(self, fidx: int, first: int, pages: int, bitmap: int | None = None) -> int:
        """Log function ``fidx``'s writes to the ``pages`` pages from bus address ``first``
        (4 KiB aligned) in a bitmap at ``bitmap`` (allocated and cleared here when None; a
        given one is used as it is: a vhost log). Returns the bitmap's address."""
        nf = await self.driver.num_functions()
        if not 0 <= fidx < nf:
            raise ValueError(f"function index {fidx} out of range: the card has {nf} functions")
        if first % PAGE:
            raise ValueError(f"first address {first:#x} is not 4 KiB aligned")
        if not 0 < pages < 1 << 32:
            raise ValueError(f"pages must be 1..{(1 << 32) - 1}, got {pages}")
        if bitmap is None:
            size = (pages + 63) // 64 * 8
            raw = self.t.alloc_host_mem(size + 7)
            bitmap = (raw + 7) & ~7
            await self.t.host_write(bitmap, bytes(size))
        w = self.driver.mgmt_write
        await w(R.SEL, fidx)
        await w(R.CTRL, R.CTRL_OVERFLOW)                 # off, overflow cleared
        await w(R.BASE_LO, bitmap & 0xFFFF_FFFF)
        await w(R.BASE_HI, bitmap >> 32)
        await w(R.FIRST_LO, first & 0xFFFF_FFFF)
        await w(R.FIRST_HI, first >> 32)
        await w(R.PAGES, pages)
        await w(R.CTRL, R.CTRL_ON)
        self.logs[fidx] = (bitmap, first, pages)
        return bitmap

    async def stop(self, fidx: int) -> None:
        """Stop logging ``fidx`` (the marks already sent still land; harvest after)."""
        await self.driver.mgmt_write(R.SEL, fidx)
        await self.driver.mgmt_write(R.CTRL, 0)

    async def drop(self, fidx: int) -> bool:
        """Stop logging ``fidx`` and forget its bitmap (a log someone else harvests: a vhost
        log); False if it had none."""
        if fidx not in self.logs:
            return False
        await self.stop(fidx)
        del self.logs[fidx]
        return True

    async def overflow(self, fidx: int, clear: bool = False) -> bool:
        """Whether ``fidx`` wrote outside its bitmap's range since the last clear."""
        await self.driver.mgmt_write(R.SEL, fidx)
        ctrl = await self.driver.mgmt_read(R.CTRL)
        if clear and ctrl & R.CTRL_OVERFLOW:
            await self.driver.mgmt_write(R.CTRL, (ctrl & R.CTRL_ON) | R.CTRL_OVERFLOW)
        return bool(ctrl & R.CTRL_OVERFLOW)

    async def marks(self) -> int:
        """Marking writes the card has sent (all functions)."""
        return await self.driver.mgmt_read(R.MARKS)

    async def harvest(self, fidx: int) -> set[int]:
        """The bus addresses of the pages marked since the last harvest; clears them."""
        try:
            bitmap, first, pages = self.logs[fidx]
        except KeyError:
            raise ValueError(f"function {fidx} has no dirty log") from None
        size = (pages + 7) // 8
        data = await self.t.host_read(bitmap, size)
        await self.t.host_write(bitmap, bytes(size))     # (no simulator step in between)
        out = set()
        for i, byte in enumerate(data):
            if byte:
                for b in range(8):
                    if byte >> b & 1 and 8 * i + b < pages:
                        out.add(first + (8 * i + b) * PAGE)
        return out
