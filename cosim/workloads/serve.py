"""A simulated card that waits for a person or a firmware on its management UART.

Brings the card up through the RootComplex (PF, ``OFFCARD_SERVE_VFS`` VFs) and serves the UART
on ``OFFCARD_UART_PORT`` (TCP, 0 = any free port) or a pty (``OFFCARD_UART_PTY=1``), printing the
URL, until ``OFFCARD_SERVE_S`` wall seconds have passed or, with ``OFFCARD_SERVE_ONCE=1``, the
first client has disconnected. Started by ``python -m cosim.serve_uart``.
"""

import os
import time

import cocotb
from cocotb.triggers import ClockCycles

from hdl.config import CardConfig
from cosim.harness import CardHarness
from cosim.uart_bridge import UartBridge, UartPhy


@cocotb.test()
async def test_serve_uart(dut):
    h = CardHarness(dut)
    await h.start()
    await h.drv.probe()
    nvf = int(os.environ.get("OFFCARD_SERVE_VFS", "2"))
    if nvf:
        await h.drv.enable_sriov(nvf)
    phy = UartPhy(dut, CardConfig().uart_divisor)
    pty = os.environ.get("OFFCARD_UART_PTY") == "1"
    bridge = UartBridge(phy, "pty" if pty else "tcp",
                        port=int(os.environ.get("OFFCARD_UART_PORT", "0")))
    url_file = os.environ.get("OFFCARD_URL_FILE")
    if url_file:
        with open(url_file + ".tmp", "w") as fh:
            fh.write(bridge.url + "\n")
        os.replace(url_file + ".tmp", url_file)
    dut._log.info("management UART at %s", bridge.url)
    print(f"offcard: management UART at {bridge.url}", flush=True)
    deadline = time.monotonic() + float(os.environ.get("OFFCARD_SERVE_S", "600"))
    once = os.environ.get("OFFCARD_SERVE_ONCE") == "1"
    seen = False
    while time.monotonic() < deadline:
        await ClockCycles(dut.clk, 2000)
        seen = seen or bridge.connected
        if once and seen and not bridge.connected:
            break
    bridge.close()
    dut._log.info("served %d bytes in, %d out", bridge.bytes_in, bridge.bytes_out)
