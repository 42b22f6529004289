"""offcard management firmware (issue 6): telemetry, thresholds, placement, QoS, logs.

It will reach the card only through the management UART (pyserial) or BAR registers; for now
the package exists so the layout of the repository matches the architecture.
"""
