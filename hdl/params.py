"""Elaboration parameters of the card and its fixed address map."""

from dataclasses import dataclass, field, asdict

__all__ = ["CardConfig", "FuncRegs", "MgmtRegs", "Bar0Map", "DmaRegs"]


class Bar0Map:
    """Layout of BAR0 of every function (PF and VF alike), byte offsets."""
    FUNC_REGS = 0x0000   # hdl.func_regs
    VIRTIO    = 0x1000   # reserved for the virtio-pci structures
    MSIX_TABLE = 0x2000  # 16 bytes per vector
    MSIX_PBA  = 0x3000   # one bit per vector
    SIZE      = 0x4000


class FuncRegs:
    """Per-function register file at BAR0 + 0x0000 (byte offsets)."""
    ID       = 0x00   # RO: 0xC0DE << 16 | is_vf << 15 | function index
    VERSION  = 0x04   # RO: design version
    SCRATCH  = 0x08   # RW: one word per function
    IRQ      = 0x0C   # WO: writing N requests MSI-X vector N of this function
    ID_MAGIC = 0xC0DE
    VERSION_VALUE = 0x0001_0000


class DmaRegs:
    """Per-function DMA queue registers at BAR0 + 0x100 (byte offsets); see hdl.dma_queue."""
    BASE      = 0x100
    RING_LO   = 0x100   # RW: ring base, 32-byte aligned
    RING_HI   = 0x104   # RW
    RING_LOG2 = 0x108   # RW: ring entries = 1 << value (0..8)
    CTRL      = 0x10C   # RW: bit 0 enable (0 also resets the indices), [12:8] MSI-X vector
    PROD      = 0x110   # RW: producer index, the doorbell
    CONS      = 0x114   # RO: consumer index (descriptors finished)
    STATUS    = 0x118   # RO: bit 1 error (a descriptor fetch failed; cleared by disabling)
    DESC_SIZE = 32


class MgmtRegs:
    """PF BAR2 card registers (byte offsets)."""
    CARD_ID        = 0x00   # RO: "OFFC"
    CARD_CONFIG    = 0x04   # RO: total_vfs [15:0], data width/32 [23:16], msix vectors [31:24]
    ERR_MALFORMED  = 0x10   # RO: malformed TLPs dropped (or answered UR)
    ERR_UNSUPPORTED = 0x14  # RO: requests answered with UR, posted requests that hit nothing
    ERR_CA         = 0x18   # RO: requests answered with Completer Abort
    ERR_UNEXP_CPL  = 0x1C   # RO: completions that matched no outstanding request
    ERR_POISONED   = 0x20   # RO: poisoned requests received
    RX_TLPS        = 0x24   # RO: TLPs received
    TX_TLPS        = 0x28   # RO: TLPs sent
    CARD_ID_VALUE  = 0x4F464643  # "OFFC"
    SIZE = 0x1000


@dataclass(frozen=True)
class CardConfig:
    """Everything that changes the elaborated card.

    ``total_vfs``   -- SR-IOV TotalVFs (InitialVFs is the same). VF *n* (1-based) sits at routing
                       ID function number *n* (First VF Offset 1, VF Stride 1, with ARI).
    ``data_width``  -- TLP stream data width in bits: 64, 128 or 256.
    ``msix_vectors``-- MSI-X vectors per function (PF and VFs alike).
    """
    total_vfs: int = 16
    data_width: int = 64
    msix_vectors: int = 4
    vendor_id: int = 0x1AF4          # virtio
    device_id: int = 0x1041          # virtio-net, modern transport
    vf_device_id: int = 0x1041
    subsystem_vendor_id: int = 0x1AF4
    subsystem_id: int = 0x0001
    revision_id: int = 0x01
    class_code: int = 0x020000       # Ethernet controller
    bar0_size: int = Bar0Map.SIZE    # 64-bit prefetchable, PF
    bar2_size: int = MgmtRegs.SIZE   # 32-bit non-prefetchable, PF only
    vf_bar0_size: int = Bar0Map.SIZE # 64-bit prefetchable, per VF
    max_mmio_dw: int = 16            # longest MMIO read/write the completer serves

    def __post_init__(self):
        def pow2(x):
            return x > 0 and x & (x - 1) == 0
        if not (1 <= self.total_vfs <= 255):
            raise ValueError(f"total_vfs must be 1..255 (ARI function numbers), got {self.total_vfs}")
        if self.data_width not in (64, 128, 256):
            raise ValueError(f"data_width must be 64, 128 or 256, got {self.data_width}")
        if not (1 <= self.msix_vectors <= 32) or not pow2(self.msix_vectors):
            raise ValueError(f"msix_vectors must be a power of two in 1..32, got {self.msix_vectors}")
        for name in ("bar0_size", "bar2_size", "vf_bar0_size"):
            v = getattr(self, name)
            if not pow2(v) or v < 0x1000:
                raise ValueError(f"{name} must be a power of two >= 4096, got {v}")
        if self.bar0_size < Bar0Map.SIZE or self.vf_bar0_size < Bar0Map.SIZE:
            raise ValueError("BAR0 sizes must hold the BAR0 map (16 KiB)")
        if not pow2(self.max_mmio_dw):
            raise ValueError("max_mmio_dw must be a power of two")

    @property
    def num_functions(self):
        return 1 + self.total_vfs

    def as_dict(self):
        return asdict(self)
