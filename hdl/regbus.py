"""The DW register bus from the completer to the BAR targets.

One access at a time: ``we`` or ``re`` is a one-cycle strobe; read data is valid on ``rdata``
the cycle after ``re``. Every target decodes its own window (``fidx``, ``bar``, ``addr``) and
drives zero on ``rdata`` when it was not addressed, so the completer ORs the targets' data.
"""

from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .bar_decode import OFFSET_DW_BITS

__all__ = ["RegBusSignature"]


def RegBusSignature():
    return wiring.Signature({
        "fidx":  Out(8),
        "bar":   Out(3),
        "addr":  Out(OFFSET_DW_BITS),   # DW offset inside the BAR
        "wdata": Out(32),
        "be":    Out(4),
        "we":    Out(1),
        "re":    Out(1),
        "rdata": In(32),
    })
