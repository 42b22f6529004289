"""``python -m hdl``: write the Verilog of the card for a chosen configuration."""

import argparse
import re
import sys
from pathlib import Path

from .params import CardConfig


# Icarus Verilog 11 starts an ``always @*`` block only when one of its inputs changes, so a block
# whose inputs keep their initial value (or that reads only constants) never runs and its outputs
# stay X. ``always_comb`` (IEEE 1800) also runs once at time zero; Icarus (-g2012) and Verilator
# both accept it, and synthesis reads the design from RTLIL, not from this text.
_ALWAYS_STAR = re.compile(r"^(\s*)always @\*$", re.M)


def generate_verilog(cfg: CardConfig, name: str = "offcard") -> str:
    from amaranth.back import verilog
    from .card import Card
    top = Card(cfg)
    text = verilog.convert(top, name=name, emit_src=False)
    return _ALWAYS_STAR.sub(r"\1always_comb", text)


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
