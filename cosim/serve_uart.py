"""``python -m cosim.serve_uart``: run the simulated card and serve its management UART.

    python -m cosim.serve_uart --port 7000          # then, elsewhere:
    python -m firmware --port socket://127.0.0.1:7000 --policy firmware/example_policy.toml
    python -m serial.tools.miniterm --filter hexlify socket://127.0.0.1:7000

The card is brought up (PF and VFs) by the host model in the same simulation; the UART bridge
(:mod:`cosim.uart_bridge`) listens on the TCP port, or opens a pty with ``--pty``.
"""

import argparse
import sys

from hdl.config import CardConfig
from .card_sim import run_card_bench


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m cosim.serve_uart", description=__doc__.split("\n")[0])
    ap.add_argument("--sim", default="verilator", choices=("icarus", "verilator"))
    ap.add_argument("--port", type=int, default=7000, help="TCP port (0: any free one)")
    ap.add_argument("--pty", action="store_true", help="serve a pty instead of a TCP port")
    ap.add_argument("--vfs", type=int, default=2, help="VFs to enable (0..16)")
    ap.add_argument("--seconds", type=float, default=600.0, help="wall seconds to serve")
    ap.add_argument("--once", action="store_true", help="stop when the first client leaves")
    ap.add_argument("--url-file", help="write the URL to this file once it is open")
    args = ap.parse_args(argv)
    if not 0 <= args.port <= 65535:
        ap.error(f"--port {args.port}: not a TCP port")
    if not 0 <= args.vfs <= CardConfig().total_vfs:
        ap.error(f"--vfs {args.vfs}: the card has {CardConfig().total_vfs} VFs")
    if args.seconds <= 0:
        ap.error("--seconds must be positive")
    env = {"OFFCARD_UART_PORT": str(args.port), "OFFCARD_UART_PTY": "1" if args.pty else "0",
           "OFFCARD_SERVE_VFS": str(args.vfs), "OFFCARD_SERVE_S": str(args.seconds),
           "OFFCARD_SERVE_ONCE": "1" if args.once else "0"}
    if args.url_file:
        env["OFFCARD_URL_FILE"] = args.url_file
    res = run_card_bench(args.sim, "cosim.workloads.serve", CardConfig(), extra_env=env,
                         timeout_s=args.seconds + 900)
    return 0 if res.num_failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
