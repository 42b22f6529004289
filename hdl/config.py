"""The card's elaboration parameters: everything that changes the elaborated design."""

from dataclasses import dataclass, asdict

from regmap import Bar0Map, MgmtRegs

__all__ = ["CardConfig"]


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
    uart_divisor: int = 8            # card clocks per management-UART bit (1085: 115200 Bd at
                                     # 125 MHz; the simulations use 8 to stay fast)

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
        if not (4 <= self.uart_divisor <= 65535):
            raise ValueError(f"uart_divisor must be 4..65535 clocks per bit, got {self.uart_divisor}")
        if not pow2(self.max_mmio_dw):
            raise ValueError("max_mmio_dw must be a power of two")

    @property
    def num_functions(self):
        return 1 + self.total_vfs

    def as_dict(self):
        return asdict(self)
