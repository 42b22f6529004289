"""offcard's register map: the contract between the gateware, the host driver and the firmware.

Plain Python (no Amaranth): the RTL (``hdl/``), the host driver (``host_driver/``) and the
firmware (``firmware/``) all import it, so a register or a record is defined in one place.

* :mod:`regmap.bar0`     -- BAR0 of every function: function registers, DMA queue, virtio-pci
* :mod:`regmap.bar2`     -- PF BAR2: card registers, IOMMU, fault queues, switch, migration,
  management block, dirty-page log
* :mod:`regmap.cfgspace` -- the virtio vendor capabilities in configuration space
* :mod:`regmap.windows`  -- every register window in one table, and the overlap check
* :mod:`regmap.records`  -- records kept in host memory (DMA descriptor, FBQ / IOPF / CQ
  entries, page-table entries) as field tables, with the host's pack / unpack
* :mod:`regmap.protocol` -- the management UART's frames and the mailbox words
"""

from .bar0 import Bar0Map, FuncRegs, DmaRegs, VirtioRegs
from .bar2 import (MgmtRegs, IommuRegs, FaultRegs, NetRegs, MigRegs, MgmtBlockRegs, DirtyLogRegs,
                   Owner)
from .cfgspace import VirtioCaps
from .protocol import UartProto, MboxMsg
from .records import (DescStatus, PAGE_SHIFT, PTE_PRESENT, DESCRIPTOR, FBQ_ENTRY, IOPF_ENTRY,
                      CQ_ENTRY, PTE, RECORDS, Record, Field)
from .windows import WINDOWS, Window, window

__all__ = ["Bar0Map", "FuncRegs", "DmaRegs", "VirtioRegs", "MgmtRegs", "IommuRegs", "FaultRegs",
           "NetRegs", "MigRegs", "MgmtBlockRegs", "DirtyLogRegs", "Owner", "VirtioCaps", "UartProto", "MboxMsg",
           "DescStatus", "PAGE_SHIFT", "PTE_PRESENT", "DESCRIPTOR", "FBQ_ENTRY", "IOPF_ENTRY",
           "CQ_ENTRY", "PTE", "RECORDS", "Record", "Field", "WINDOWS", "Window", "window"]
