"""Every register window of the card in one table, and the check that no two overlap.

A window is a byte range of one BAR that one register file of the RTL serves (``target``, the
name the card gives that block). BAR0 windows exist in every function (the PF and each VF,
``functions="all"``); BAR2 windows only in the PF. The register files decode their windows from
this table (:class:`hdl.pcie.regfile.RegisterFile`), and :func:`check` runs in the tests, so a
register added on top of another one is caught before it is built.
"""

from dataclasses import dataclass

from .bar0 import Bar0Map, FuncRegs, DmaRegs, VirtioRegs as V
from .bar2 import (MgmtRegs, IommuRegs, FaultRegs, NetRegs, MigRegs, DirtyLogRegs,
                   MgmtBlockRegs as MB)

__all__ = ["Window", "WINDOWS", "window", "check", "MSIX_MAX_VECTORS"]

#: The largest MSI-X table a configuration may have (``CardConfig.msix_vectors``).
MSIX_MAX_VECTORS = 32


@dataclass(frozen=True)
class Window:
    name: str
    bar: int
    base: int            # byte offset of the first register
    limit: int           # byte offset past the last one
    target: str          # the RTL block serving it
    functions: str       # "all": PF and VFs, "pf": the PF only
    doc: str = ""

    def __contains__(self, offset):
        return self.base <= offset < self.limit

    @property
    def size(self):
        return self.limit - self.base


WINDOWS = (
    # BAR0, every function
    Window("func", 0, Bar0Map.FUNC_REGS, FuncRegs.IRQ + 4, "funcregs", "all",
           "ID, version, scratch, interrupt trigger"),
    Window("dma_queue", 0, DmaRegs.BASE, DmaRegs.STATUS + 4, "dma_q", "all",
           "the function's DMA descriptor ring"),
    Window("virtio_common", 0, V.COMMON, V.COMMON + V.COMMON_LEN, "virtio", "all",
           "struct virtio_pci_common_cfg"),
    Window("virtio_notify", 0, V.NOTIFY, V.NOTIFY + V.NOTIFY_LEN, "virtio", "all",
           "queue notifications"),
    Window("virtio_isr", 0, V.ISR, V.ISR + V.ISR_LEN, "virtio", "all", "ISR status"),
    Window("virtio_device", 0, V.DEVICE, V.DEVICE + V.DEVICE_LEN, "virtio", "all",
           "struct virtio_net_config"),
    Window("msix_table", 0, Bar0Map.MSIX_TABLE, Bar0Map.MSIX_TABLE + 16 * MSIX_MAX_VECTORS,
           "msix", "all", "MSI-X table, 16 bytes per vector"),
    Window("msix_pba", 0, Bar0Map.MSIX_PBA, Bar0Map.MSIX_PBA + 8, "msix", "all",
           "MSI-X pending bits"),
    # PF BAR2
    Window("card", 2, MgmtRegs.CARD_ID, MgmtRegs.TX_TLPS + 4, "mgmt", "pf",
           "card ID, configuration, error and traffic counters"),
    Window("iommu", 2, IommuRegs.DOM_SEL, IommuRegs.BLOCKED + 4, "xlate", "pf",
           "translation domains, device TLB"),
    Window("fault", 2, FaultRegs.FBQ_LO, FaultRegs.CQ_BAD + 4, "fault", "pf",
           "I/O page fault queues"),
    Window("net", 2, NetRegs.TX_FRAMES, NetRegs.DROP_CSUM + 4, "vnet", "pf",
           "the virtio-net switch's counters and control"),
    Window("net_coal", 2, NetRegs.COAL, NetRegs.COAL_Q + 4 * V.NUM_QUEUES_VALUE,
           "vnet", "pf", "the virtio-net engine's used-ring coalescing, default and per queue"),
    Window("migration", 2, MigRegs.SEL, MigRegs.MAC_HI + 4, "vnet", "pf",
           "per-function quiesce, device queue indices, station address"),
    Window("mgmt_block", 2, MB.BLOCK_ID, MB.CYCLES_HI + 4, "mboard", "pf",
           "management block ID, utilisation, cycle counter"),
    Window("telemetry", 2, MB.TEL_SEL, MB.TEL_QOS_WAIT + 4, "telemetry", "pf",
           "per-function telemetry counters"),
    Window("qos", 2, MB.QOS_SEL, MB.QOS_TOKENS + 4, "qos", "pf", "per-function token buckets"),
    Window("mgmt_tasks", 2, MB.MBOX_H2C, MB.LIMIT, "mboard", "pf",
           "mailbox, task owners and request FIFOs"),
    Window("dirty_log", 2, DirtyLogRegs.SEL, DirtyLogRegs.MARKS + 4, "dirtylog", "pf",
           "per-function dirty-page logging for live migration"),
)


def window(name) -> Window:
    for w in WINDOWS:
        if w.name == name:
            return w
    raise KeyError(f"no register window {name!r}")


def check(windows=WINDOWS, bar_sizes=None):
    """Raise ``ValueError`` naming the first problem: two windows of one BAR that overlap, a
    name used twice, a window that is empty or not DW aligned, or one past the end of its BAR
    (``bar_sizes``: ``{bar: bytes}``)."""
    names = set()
    for w in windows:
        if w.name in names:
            raise ValueError(f"register window {w.name!r} defined twice")
        names.add(w.name)
        if w.limit <= w.base or w.base % 4 or w.limit % 4:
            raise ValueError(f"register window {w.name!r} {w.base:#x}..{w.limit:#x} is empty "
                             f"or not DW aligned")
        if w.functions not in ("all", "pf"):
            raise ValueError(f"register window {w.name!r}: functions must be 'all' or 'pf'")
        if bar_sizes and w.limit > bar_sizes.get(w.bar, 0):
            raise ValueError(f"register window {w.name!r} ends at {w.limit:#x}, past BAR{w.bar}")
    by_bar = {}
    for w in windows:
        by_bar.setdefault(w.bar, []).append(w)
    for bar, ws in by_bar.items():
        ws = sorted(ws, key=lambda w: w.base)
        for a, b in zip(ws, ws[1:]):
            if b.base < a.limit:
                raise ValueError(f"BAR{bar}: register windows {a.name!r} ({a.base:#x}..{a.limit:#x})"
                                 f" and {b.name!r} ({b.base:#x}..{b.limit:#x}) overlap")
