"""The management block: what the firmware and the host's management agent see of the card.

* :mod:`.card_regs` -- PF BAR2 card identification and error / traffic counters
* :mod:`.block`     -- utilisation, cycle counter, mailbox, task owners and request FIFOs
* :mod:`.telemetry` -- per-function counters in block RAM
* :mod:`.qos`       -- per-function token buckets on the virtio transmit path
* :mod:`.uart`      -- the UART's receiver and transmitter
* :mod:`.frames`    -- the UART's frame engine: requests in, register accesses, replies out
"""
