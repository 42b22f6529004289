"""Address translation and I/O page faults.

* :mod:`.atc`       -- the device TLB (address translation cache)
* :mod:`.translate` -- per-function domains and the page-table walker
* :mod:`.fault`     -- staging buffers and the FBQ / IOPF / CQ queues
"""
