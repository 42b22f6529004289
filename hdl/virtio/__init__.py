"""virtio-net on every function.

* :mod:`.transport` -- the virtio-pci modern transport (common config, notify, ISR, device config)
* :mod:`.net`       -- the split-virtqueue engine and the frame switch
* :mod:`.mac_table` -- the switch's station table
"""
