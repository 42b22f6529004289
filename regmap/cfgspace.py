"""Configuration space the card adds beside the PCI Express standard capabilities: the
virtio vendor-specific capabilities (the standard ones, PCIe / MSI-X / ARI / SR-IOV, are the
host's to know from the specification)."""

__all__ = ["VirtioCaps"]


class VirtioCaps:
    """Vendor-specific (virtio) PCI capabilities, the same on the PF and on every VF."""
    COMMON = 0xA0
    NOTIFY = 0xB0
    ISR = 0xC4
    DEVICE = 0xD4
    CFG_TYPE_COMMON = 1
    CFG_TYPE_NOTIFY = 2
    CFG_TYPE_ISR = 3
    CFG_TYPE_DEVICE = 4
