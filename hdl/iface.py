"""The signatures and record layouts the card's subsystems meet at.

Every subsystem (``pcie/``, ``dma/``, ``iommu/``, ``virtio/``, ``mgmt/``) takes its ports from
here, never from another subsystem's module, so the only place that knows two blocks talk is
:mod:`hdl.card`, which connects them.

* the configuration space's state that the engines follow: the link settings
  (:func:`LinkSignature`) and each function's enables and reset strobes
  (:func:`FunctionStateSignature`), each connected from the configuration space to every engine
  at once;
* the register bus from the bus masters to the register files (:func:`RegBusSignature`);
* interrupt requests into the MSI-X block (:func:`IrqRequestSignature`) and events into the
  telemetry counters (:func:`EventSignature`), the completer's error strobes
  (:func:`ErrorEvents`);
* DMA commands and their results (:data:`DmaCmd`, :data:`DmaDone`, :class:`DmaStatus`) and the
  card memory ports (:func:`MemReadPort`, :func:`MemWritePort`);
* address translation requests (:data:`XlateReq`, :data:`XlateResp`, :class:`XlateStatus`) and
  the fault unit's ports (:func:`FaultReqSignature` and its companions);
* the uplink port's beat (:func:`UplinkBeat`) and the frame buffer ports;
* :data:`CPL_TIMEOUT`, the completion timeout every engine that reads host memory uses;
* :func:`record_layout`, the Amaranth layout of a record kept in host memory, derived from its
  field table in :mod:`regmap.records` (the host packs the same table).
"""

from amaranth import unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .memmap import CARD_ADDR_BITS, CARD_SPACE, PKT_WORDS, Staging

__all__ = ["LinkSignature", "FunctionStateSignature", "OFFSET_DW_BITS", "RegBusSignature", "READ_LATENCY", "REQUEST_FIELDS",
           "IrqRequestSignature", "EventSignature", "OccupancySignature", "ERROR_EVENTS", "ErrorEvents",
           "DmaCmd", "DmaDone", "DmaStatus", "MemWritePort", "MemReadPort", "CPL_TIMEOUT",
           "XlateReq", "XlateResp", "XlateStatus", "FaultReqSignature", "ResumeSignature",
           "SlotFreeSignature", "ReleaseSignature", "UplinkBeat", "PktReadPort", "PktWritePort",
           "record_layout"]

#: Width of a DW offset inside a BAR.
OFFSET_DW_BITS = 20

#: Cycles without any completion while a host read is outstanding before an engine gives up
#: (200 us at 250 MHz).
CPL_TIMEOUT = 50_000


# ---- configuration state --------------------------------------------------------------------

def LinkSignature():
    """The link settings every requester needs (configuration space -> engines): the bus
    number captured from the host's first configuration write (the requester IDs), and the
    PF's Max Payload Size and Max Read Request Size codes (Device Control)."""
    return wiring.Signature({"bus_num": Out(8), "mps": Out(3), "mrrs": Out(3)})


def FunctionStateSignature(num_functions):
    """Per function (bit *n* = function index *n*): Bus Master Enable, MSI-X Enable and
    Function Mask (each gated by the function being enabled and in D0); and the reset strobes,
    registered, one cycle after the configuration write that asks for them: ``flr`` (function
    level reset of ``flr_fidx``) and ``vf_reset`` (VF Enable was cleared: every VF resets)."""
    nf = num_functions
    return wiring.Signature({
        "bme": Out(nf), "msix_en": Out(nf), "msix_fmask": Out(nf),
        "flr": Out(1), "flr_fidx": Out(8), "vf_reset": Out(1),
    })


# ---- register bus ---------------------------------------------------------------------------

#: Cycles from a master's ``re`` to its ``rdata``: two slices, then one in the target.
READ_LATENCY = 3

#: The members a master drives (all but ``rdata``); strobes last.
REQUEST_FIELDS = ("fidx", "bar", "addr", "wdata", "be", "we", "re")

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


# ---- interrupts, events ---------------------------------------------------------------------

def IrqRequestSignature():
    return wiring.Signature({"valid": Out(1), "fidx": Out(8), "vector": Out(5)})


def EventSignature(amount_bits=1):
    """A one-cycle event for function ``fidx`` that adds ``amount`` (1 when 1 bit wide)."""
    return wiring.Signature({"stb": Out(1), "fidx": Out(8), "amount": Out(amount_bits)})


def OccupancySignature():
    """The telemetry's read of one function's DMA ring occupancy (the reader's side)."""
    return wiring.Signature({"fidx": Out(8), "occ": In(16)})


#: The errors the card counts in PF BAR2 and reports in the PF's status bits.
ERROR_EVENTS = ("malformed", "unsupported", "ca", "poisoned", "unexp_cpl")


def ErrorEvents():
    """One-cycle strobes, one per error seen (the completer's side: it sees every request)."""
    return wiring.Signature({name: Out(1) for name in ERROR_EVENTS})


# ---- DMA ------------------------------------------------------------------------------------

DmaCmd = data.StructLayout({
    "fidx":   8,       # function the transfer is done for (its requester ID is used)
    "host":   64,      # host (bus) address
    "card":   CARD_ADDR_BITS,   # card memory byte address (any byte offset, like ``host``)
    "length": 17,      # bytes, 1..65536
})


class DmaStatus:
    OK = 0
    CPL_ERROR = 1      # a completion came back UR / CA, or with a bad size
    RANGE = 2          # host + length passes 2**64: refused before anything moved


DmaDone = data.StructLayout({"status": 2})


def MemWritePort(data_width):
    return wiring.Signature({
        "addr": Out(range(CARD_SPACE * 8 // data_width)),
        "data": Out(data_width),
        "en":   Out(data_width // 8),     # byte enables; zero = no write
    })


def MemReadPort(data_width):
    return wiring.Signature({
        "addr": Out(range(CARD_SPACE * 8 // data_width)),
        "en":   Out(1),
        "data": In(data_width),           # one cycle after en
    })


# ---- address translation and page faults ----------------------------------------------------

class XlateStatus:
    OK = 0
    NOT_PRESENT = 1
    BLOCKED = 2
    ERROR = 3


# ``last``: the last IOVA of the whole transfer the piece at ``iova`` belongs to; a transfer that
# does not fit in the domain is blocked as a whole, before any of it moves
XlateReq = data.StructLayout({"fidx": 8, "iova": 64, "last": 64})
XlateResp = data.StructLayout({"status": 2, "bypass": 1, "phys": 64, "vm": 8})


def FaultReqSignature():
    """Engine -> fault unit. ``stb`` is a one-cycle request, allowed while ``ok_w`` (writes)
    or ``ok_r`` (reads) is high; ``done`` (with the staging ``slot``) answers it."""
    return wiring.Signature({
        "stb":    Out(1),
        "fidx":   Out(8),
        "vm":     Out(8),
        "iova":   Out(64),
        "write":  Out(1),
        "card":   Out(CARD_ADDR_BITS),
        "length": Out(13),
        "ok_w":   In(1),
        "ok_r":   In(1),
        "done":   In(1),
        "slot":   In(range(Staging.SLOTS)),
    })


def ResumeSignature():
    """Fault unit -> engine: the host resolved function ``fidx``'s fault (``ok``: retry)."""
    return wiring.Signature({"stb": Out(1), "fidx": Out(8), "ok": Out(1)})


def SlotFreeSignature():
    return wiring.Signature({"stb": Out(1), "slot": Out(range(Staging.SLOTS))})


def ReleaseSignature():
    """A function was reset (FLR, queue disabled: ``stb`` with ``fidx``) or every VF was (VF
    Enable cleared: ``vfs``): the open faults and staging buffers of those functions go."""
    return wiring.Signature({"stb": Out(1), "fidx": Out(8), "vfs": Out(1)})


# ---- the network side -----------------------------------------------------------------------

def UplinkBeat(data_width):
    return data.StructLayout({"data": data_width, "keep": data_width // 8, "last": 1})


def PktReadPort(data_width):
    return wiring.Signature({"addr": Out(range(PKT_WORDS(data_width))), "en": Out(1),
                             "data": In(data_width)})


def PktWritePort(data_width):
    return wiring.Signature({"addr": Out(range(PKT_WORDS(data_width))),
                             "data": Out(data_width), "en": Out(data_width // 8)})


# ---- records in host memory -----------------------------------------------------------------

def record_layout(record):
    """The layout of a :class:`regmap.records.Record`: one field per entry of its table, at the
    table's bit offset (bits no field names are padding), so ``data.View(record_layout(R), v)``
    reads ``v`` the way the host's ``R.unpack`` does."""
    return data.FlexibleLayout(record.size * 8, {
        f.name: data.Field(unsigned(f.width), f.offset) for f in record.fields})
