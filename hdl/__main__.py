"""``python -m hdl``: write the Verilog of the card for a chosen configuration."""

import argparse
import re
import sys
from pathlib import Path

from .config import CardConfig


# Icarus Verilog 11 starts an ``always @*`` block only when one of its inputs changes, so a block
# whose inputs keep their initial value (or that reads only constants) never runs and its outputs
# stay X. Two rewrites make time zero well defined, without changing what the logic means:
# * a one-statement ``always @*`` becomes ``always_comb`` (IEEE 1800: also runs at time zero);
# * every larger block already reads Yosys' ``dump_module`` register (its "wake me up" trick,
#   which relies on the initializer being an event; in Icarus it is not), so that register gets
#   a real change at time zero, after every process has started waiting: ``initial #0 ... = 1``.
# Icarus runs with -g2012, Verilator accepts both; synthesis reads RTLIL, not this text.
_ALWAYS_ONE = re.compile(r"^(\s*)always @\*$", re.M)
_DUMP_REG = re.compile(r"^(\s*)reg (\\\$auto\$verilog_backend\.cc:\d+:dump_module\$\d+ ) = 0;$", re.M)


def generate_verilog(cfg: CardConfig, name: str = "offcard", top=None) -> str:
    """The Verilog of the card (or of ``top``, a component that holds it: a simulation top),
    as module ``name``, in the form both simulators read."""
    from amaranth.back import verilog
    from .card import Card
    if top is None:
        top = Card(cfg)
    text = verilog.convert(top, name=name, emit_src=False)
    text = _ALWAYS_ONE.sub(r"\1always_comb", text)
    return _DUMP_REG.sub(lambda mo: f"{mo[0]}\n`ifndef VERILATOR  // Verilator settles all logic at time zero itself\n"
                                    f"{mo[1]}initial #0 {mo[2]} = 1;\n`endif", text)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hdl", description="Write the card's Verilog.")
    ap.add_argument("-o", "--output", default="-", help="output file ('-' for stdout)")
    ap.add_argument("--total-vfs", type=int, default=CardConfig.total_vfs)
    ap.add_argument("--data-width", type=int, default=CardConfig.data_width)
    ap.add_argument("--msix-vectors", type=int, default=CardConfig.msix_vectors)
    ap.add_argument("--name", default="offcard", help="Verilog module name of the top level")
    args = ap.parse_args(argv)
    try:
        cfg = CardConfig(total_vfs=args.total_vfs, data_width=args.data_width,
                         msix_vectors=args.msix_vectors)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = generate_verilog(cfg, args.name)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
