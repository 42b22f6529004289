"""Run a cocotb bench module against the generated card, in a given simulator and configuration.

This is the one place that knows how the card is built for simulation: the generated Verilog
(:func:`cosim.verilog.verilog_for`), Icarus in IEEE 1800-2012 mode (the Verilog uses
``always_comb``), and for Verilator a ``.vlt`` control file that makes only the top-level
ports public (the bench touches nothing else).

The TLP path (:func:`cosim.bridge.tlp_path`, ``OFFCARD_TLP_PATH``) picks the top: ``tlp`` (the
default) builds ``offcard_sim``, the card behind the TLP shim, where Python hands over whole
TLPs; ``beat`` builds the card alone, ``offcard``, driven a beat at a time. The bench finds out
which it got from the top's ports (:class:`cosim.harness.CardHarness`).
"""

from pathlib import Path

from hdl.config import CardConfig

from .bridge import tlp_path
from .runner import run_cocotb, SIM_BUILD
from .verilog import verilog_for, config_key, module_ports, write_if_changed

__all__ = ["run_card_bench", "top_for", "vlt_for"]

#: The top each TLP path simulates.
TOP_OF_PATH = {"tlp": "offcard_sim", "beat": "offcard"}


def top_for(path=None) -> str:
    return TOP_OF_PATH[tlp_path(path)]


def vlt_for(src: Path, top: str, ports=None) -> Path:
    """A Verilator control file that makes the ports of ``top`` (in ``src``) public."""
    ports = module_ports(src, top) if ports is None else ports
    text = "`verilator_config\n" + "".join(
        f'public_flat_rw -module "{top}" -var "{p}"\n' for p in ports)
    return write_if_changed(SIM_BUILD / "verilog" / f"{src.stem}.vlt", text)


def run_card_bench(sim, module, cfg: CardConfig = CardConfig(), *, testcase=None, extra_env=None,
                   timeout_s=600, waves=None, build_key=None, path=None):
    """Build (cached) and run the cocotb tests of ``module`` on the card of ``cfg``; ``path``
    overrides ``OFFCARD_TLP_PATH`` (and is passed on to the bench)."""
    top = top_for(path)
    src = verilog_for(cfg, top=top)
    env = dict(extra_env or {})
    env["OFFCARD_TLP_PATH"] = tlp_path(path)
    build_args = ["-g2012"] if sim == "icarus" else []
    return run_cocotb(sim, top, [src], module, build_key or f"{top}_{config_key(cfg)}",
                      testcase=testcase, build_args=build_args, extra_env=env,
                      timeout_s=timeout_s, waves=waves,
                      vlt=vlt_for(src, top) if sim == "verilator" else None,
                      run_name=module.rsplit(".", 1)[-1] + (f"_{testcase}" if testcase else ""))
