"""Run a cocotb bench module against the generated card, in a given simulator and configuration.

This is the one place that knows how the card is built for simulation: the generated Verilog
(:func:`cosim.verilog.verilog_for`), Icarus in IEEE 1800-2012 mode (the Verilog uses
``always_comb``), and for Verilator a ``.vlt`` control file that makes only the top-level
ports public (the bench touches nothing else).
"""

from pathlib import Path

from hdl.config import CardConfig

from .runner import run_cocotb, SIM_BUILD
from .verilog import verilog_for, config_key

__all__ = ["run_card_bench", "PORTS"]

PORTS = ("clk", "rst", "rx__payload", "rx__valid", "rx__ready", "tx__payload", "tx__valid",
         "tx__ready", "uplink_tx__payload", "uplink_tx__valid", "uplink_tx__ready",
         "uplink_rx__payload", "uplink_rx__valid", "uplink_rx__ready", "util", "uart_rxd",
         "uart_txd")


def _vlt() -> Path:
    path = SIM_BUILD / "verilog" / "offcard.vlt"
    text = "`verilator_config\n" + "".join(
        f'public_flat_rw -module "offcard" -var "{p}"\n' for p in PORTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def run_card_bench(sim, module, cfg: CardConfig = CardConfig(), *, testcase=None, extra_env=None,
                   timeout_s=600, waves=None, build_key=None):
    src = verilog_for(cfg)
    build_args = ["-g2012"] if sim == "icarus" else []
    return run_cocotb(sim, "offcard", [src], module, build_key or f"offcard_{config_key(cfg)}",
                      testcase=testcase, build_args=build_args, extra_env=extra_env,
                      timeout_s=timeout_s, waves=waves,
                      vlt=_vlt() if sim == "verilator" else None,
                      run_name=module.rsplit(".", 1)[-1] + (f"_{testcase}" if testcase else ""))
