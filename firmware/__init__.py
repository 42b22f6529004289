"""offcard management firmware: telemetry, thresholds, placement of the management VMs, QoS,
event log and persisted state. It reaches the card only through the management UART
(:mod:`firmware.link`, pyserial) or the BAR registers (:class:`firmware.card.Card` takes
either). Run it with ``python -m firmware --port URL --policy FILE``.
"""
