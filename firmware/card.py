"""The card's management block seen by the firmware, and the mailbox message format.

:class:`Card` wraps any *port* with ``read(addr) -> int`` and ``write(addr, value)`` on PF BAR2
byte offsets: the management UART (:class:`firmware.link.UartLink`, the card's side) or a BAR
accessor (the host's side). The register map is :class:`regmap.MgmtBlockRegs`; the hardware
enforces task ownership (a pop by a non-owner returns 0), this class only packs and checks.

The mailbox and request word formats are :class:`regmap.MboxMsg`.
"""

from __future__ import annotations

from typing import Protocol

from regmap import MgmtBlockRegs as R, Owner, MboxMsg as M

__all__ = ["Port", "Card", "CardError", "encode_msg", "decode_msg", "START", "STOP", "READY",
           "STOPPED", "REFUSED", "OP_NAMES", "REQ_QOS_SET", "RESOURCES", "qos_rate_units"]

START, STOP, READY, STOPPED, REFUSED = M.START, M.STOP, M.READY, M.STOPPED, M.REFUSED
OP_NAMES = {START: "START", STOP: "STOP", READY: "READY", STOPPED: "STOPPED",
            REFUSED: "REFUSED"}
REQ_QOS_SET = M.REQ_QOS_SET
encode_msg = M.encode
decode_msg = M.decode

#: Utilisation inputs in UTIL byte order (byte 0 first).
RESOURCES = ("custom_hw", "processor", "memory", "network")

VALID = M.VALID
WORD_MASK = M.WORD_MASK

_TEL = (("tx_bytes", R.TEL_TX_BYTES), ("tx_frames", R.TEL_TX_FRAMES),
        ("rx_bytes", R.TEL_RX_BYTES), ("rx_frames", R.TEL_RX_FRAMES),
        ("dma_busy", R.TEL_DMA_BUSY), ("faults", R.TEL_FAULTS),
        ("occupancy", R.TEL_OCC), ("qos_wait", R.TEL_QOS_WAIT))


class CardError(Exception):
    """The card did not do what was asked (a read-back differs, a FIFO is full)."""


class Port(Protocol):
    def read(self, addr: int) -> int: ...
    def write(self, addr: int, value: int) -> None: ...


def _check_task(task: int) -> None:
    if not 0 <= task < R.TASKS:
        raise ValueError(f"task index {task} out of range 0..{R.TASKS - 1}")


class Card:
    """Typed access to the management block through ``port``.

    :meth:`cycles` extends the 32-bit ``CYCLES_LO`` to 64 bits: the first call reads
    ``CYCLES_HI`` (latched by the ``CYCLES_LO`` read) for the base, later calls read only
    ``CYCLES_LO`` and count wraps, so it must be called at least once per 2**32 clocks
    (34 s at 125 MHz).
    """

    def __init__(self, port: Port):
        self.port = port
        self._cycles: int | None = None

    def read(self, addr: int) -> int:
        return self.port.read(addr)

    def write(self, addr: int, value: int) -> None:
        self.port.write(addr, value)

    # -- status ---------------------------------------------------------------------------
    def block_id(self) -> int:
        return self.read(R.BLOCK_ID)

    def util(self) -> dict[str, int]:
        """The four utilisation inputs, percent."""
        word = self.read(R.UTIL)
        return {name: (word >> (8 * i)) & 0xFF for i, name in enumerate(RESOURCES)}

    def cycles(self) -> int:
        """Card clock cycles since reset, 64-bit, monotonic."""
        lo = self.read(R.CYCLES_LO)
        if self._cycles is None:
            self._cycles = self.read(R.CYCLES_HI) << 32 | lo
        else:
            hi = self._cycles >> 32
            if lo < (self._cycles & 0xFFFF_FFFF):
                hi += 1
            self._cycles = hi << 32 | lo
        return self._cycles

    # -- tasks ----------------------------------------------------------------------------
    def owner(self, task: int) -> int:
        """The owner register of ``task``: ``Owner.CARD`` or ``Owner.HOST``."""
        _check_task(task)
        return self.read(R.OWNER + 4 * task)

    def set_owner(self, task: int, owner: int) -> None:
        """Hand ``task`` to ``owner`` with one register write, then check it took."""
        _check_task(task)
        if owner not in (Owner.CARD, Owner.HOST):
            raise ValueError(f"owner must be {Owner.CARD} (card) or {Owner.HOST} (host), got {owner}")
        self.write(R.OWNER + 4 * task, owner)
        got = self.read(R.OWNER + 4 * task)
        if got != owner:
            raise CardError(f"task {task}: owner reads back {got}, wrote {owner}")

    def pop(self, task: int) -> int | None:
        """Take the oldest request of ``task`` (None: empty FIFO, or this side is not owner)."""
        _check_task(task)
        word = self.read(R.REQ_POP + 4 * task)
        return word & WORD_MASK if word & VALID else None

    def req_level(self, task: int) -> int:
        _check_task(task)
        return self.read(R.REQ_LEVEL + 4 * task)

    # -- mailbox --------------------------------------------------------------------------
    def mbox_send(self, word: int) -> None:
        """Send a 31-bit word to the host agent; raise CardError if its FIFO is full."""
        if not 0 <= word <= WORD_MASK:
            raise ValueError(f"mailbox word {word:#x} is wider than 31 bits")
        if (self.read(R.MBOX_STAT) >> 8) & 0xFF >= R.MBOX_DEPTH:
            raise CardError("mailbox to the host is full")
        self.write(R.MBOX_C2H, word)

    def mbox_recv(self) -> int | None:
        """The oldest word from the host agent, or None."""
        word = self.read(R.MBOX_H2C)
        return word & WORD_MASK if word & VALID else None

    # -- QoS and telemetry ------------------------------------------------------------------
    def set_qos(self, fidx: int, rate_bytes_per_clock: float, burst: int) -> int:
        """Program function ``fidx``'s token bucket; rate 0 = unlimited. Returns the rate
        register value (1/256 byte per clock)."""
        units = qos_rate_units(rate_bytes_per_clock)
        if not 0 <= fidx <= 0xFF:
            raise ValueError(f"function index {fidx} out of range 0..255")
        if isinstance(burst, bool) or not isinstance(burst, int) or not 0 <= burst <= 0x7FFF:
            raise ValueError(f"burst {burst!r} out of range 0..32767 bytes")
        self.write(R.QOS_SEL, fidx)
        self.write(R.QOS_RATE, units)
        self.write(R.QOS_BURST, burst)
        got = (self.read(R.QOS_RATE), self.read(R.QOS_BURST))
        if got != (units, burst):
            raise CardError(f"function {fidx}: QoS reads back rate={got[0]} burst={got[1]}, "
                            f"wrote rate={units} burst={burst}")
        return units

    def telemetry(self, fidx: int) -> dict[str, int]:
        """The per-function counters of ``fidx`` (32-bit, wrapping)."""
        if not 0 <= fidx <= 0xFF:
            raise ValueError(f"function index {fidx} out of range 0..255")
        self.write(R.TEL_SEL, fidx)
        return {name: self.read(addr) for name, addr in _TEL}


def qos_rate_units(rate_bytes_per_clock: float) -> int:
    """Convert bytes per clock to the 16-bit ``QOS_RATE`` unit (1/256 byte per clock)."""
    if isinstance(rate_bytes_per_clock, bool) or not isinstance(rate_bytes_per_clock, (int, float)):
        raise ValueError(f"rate {rate_bytes_per_clock!r} is not a number")
    units = round(rate_bytes_per_clock * 256)
    if rate_bytes_per_clock < 0 or units > 0xFFFF:
        raise ValueError(f"rate {rate_bytes_per_clock} B/clk out of range 0..{0xFFFF / 256:.4f}")
    if rate_bytes_per_clock > 0 and units == 0:
        raise ValueError(f"rate {rate_bytes_per_clock} B/clk is below 1/256 and would mean unlimited")
    return units
