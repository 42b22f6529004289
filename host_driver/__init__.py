"""offcard host software: PCIe enumeration, SR-IOV, and (later) virtio, IOMMU and migration.

Nothing here imports cocotb: the driver talks to a :class:`host_driver.transport.Transport`,
which the co-simulation implements with cocotbext-pcie's ``RootComplex`` and which a vfio
back-end could implement on real hardware.
"""
