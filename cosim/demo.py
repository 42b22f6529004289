"""``make demo`` (``python -m cosim.demo``): the card's whole story in one run, with a report.

Runs :mod:`cosim.workloads.demo` on the two-card top in one simulator (``SIM``, default
Verilator) while a rich progress display follows its phases, then writes the report folder
(``--out``, default ``demo_out/``):

* ``summary.md``: one section per phase with its numbers;
* ``timeline.png``: card load, where the management VM runs, the guest's traffic and where
  it runs, over simulated time; below, the Linux guest's pings across its QEMU migration,
  each by the card it entered the network at (matplotlib);
* ``demo.json``: the same numbers, ``bench``-style (simulator and configuration on each row),
  the timeline samples and the pings;
* ``waves.fst`` (Verilator) or ``offcard_twin.fst`` (Icarus) when ``WAVES=1``.

``--short`` shortens the traffic phases (what CI runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from hdl.config import CardConfig
from .verilog import REPO, config_key

PHASES = [("enumerate", "enumerate both cards, enable VFs"),
          ("traffic", "guest and peer exchange frames"),
          ("page_fault", "I/O page fault raised and resolved"),
          ("firmware", "card load: management VM to the host and back"),
          ("migration", "live migration of the guest to card B"),
          ("linux", "Linux guests (QEMU) on card A's VF1 and card B's VF2 ping"),
          ("linux_migration", "QEMU migrates the pinging Linux guest to card B")]
SECTIONS = ("enumeration", "traffic", "page_fault", "firmware", "migration", "simulation",
            "linux", "linux_migration")
TITLES = {"enumeration": "Enumeration", "traffic": "Guest traffic", "page_fault": "I/O page fault",
          "firmware": "Firmware placement", "migration": "Live migration",
          "simulation": "Simulation", "linux": "Linux guests on card A's VF1 and card B's VF2",
          "linux_migration": "Live migration of the Linux guest (QEMU, card A to card B)"}


class _Args(argparse.ArgumentParser):
    def error(self, message):                     # one line, naming the problem
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse(argv):
    ap = _Args(prog="python -m cosim.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--short", action="store_true", help="short traffic phases (CI)")
    ap.add_argument("--out", default=str(REPO / "demo_out"), help="report folder")
    args = ap.parse_args(argv)
    sim = os.environ.get("SIM") or "verilator"
    try:
        from .runner import ALL_SIMS           # (reads SIM as it loads: a bad one raises)
    except ValueError as e:
        ap.error(str(e))
    if sim not in ALL_SIMS:
        ap.error(f"SIM={sim!r}: the demo runs in one simulator, {' or '.join(ALL_SIMS)}")
    return args, sim


def read_events(path: Path, skip: int = 0) -> list[dict]:
    """The events in ``path`` after the first ``skip`` (only whole lines: the bench may be
    writing the last one)."""
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]
    return [json.loads(line) for line in lines[skip:] if line.strip()]


def run(sim: str, short: bool, events: Path, console: Console):
    """The benches in a thread (the two-card story, then the Linux guests on the two cards);
    the progress display follows their phase events."""
    from .twin import run_twin_bench
    box = {}
    env = {"OFFCARD_DEMO_EVENTS": str(events), "OFFCARD_DEMO_SHORT": "1" if short else "0"}

    def body():
        try:
            box["res"] = run_twin_bench(sim, "cosim.workloads.demo", CardConfig(), extra_env=env,
                                        timeout_s=900)
            run_twin_bench(sim, "cosim.workloads.demo_linux", CardConfig(), extra_env=env,
                           timeout_s=900)
        except BaseException as e:              # reported below, after the display stops
            box["err"] = e
    th = threading.Thread(target=body, daemon=True)
    th.start()
    cols = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn()]
    with Progress(*cols, console=console) as prog:
        tasks = {name: prog.add_task(text, total=1, info="", start=False) for name, text in PHASES}
        build = prog.add_task(f"build the two-card model ({sim})", total=1, info="")
        seen = 0                                # events already shown (only new ones are read)
        while th.is_alive():
            evs = read_events(events, skip=seen)
            seen += len(evs)
            if seen:
                prog.update(build, completed=1)
            for e in evs:
                if e["kind"] != "phase":
                    continue
                t = tasks[e["name"]]
                prog.start_task(t)
                if e["state"] == "done":
                    prog.update(t, completed=1, info=f"t = {e['t_us']:.0f} us simulated")
                else:
                    prog.update(t, info="running")
            time.sleep(0.5)
    if "err" in box:
        raise box["err"]
    return box["res"]


def plot(samples: list[dict], results: dict, path: Path, pings: list[dict] = ()) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_us"] for s in samples]
    fig = plt.figure(figsize=(9, 9))
    grid = fig.add_gridspec(4, 1)
    ax1 = fig.add_subplot(grid[0])
    ax2 = fig.add_subplot(grid[1], sharex=ax1)
    ax3 = fig.add_subplot(grid[2], sharex=ax1)
    ax4 = fig.add_subplot(grid[3])                # the Linux run: a simulation of its own
    ax1.step(t, [s["load_pct"] for s in samples], where="post", color="tab:red")
    thr = results.get("firmware", {}).get("threshold_pct")
    if thr is not None:
        ax1.axhline(thr, color="grey", linestyle="--", linewidth=1, label=f"threshold {thr} %")
        ax1.legend(loc="upper left")
    ax1.set_ylabel("card A load (%)")
    ax2.step(t, [1 if s["owner"] == "host" else 0 for s in samples], where="post",
             color="tab:blue")
    ax2.set_yticks([0, 1], ["card", "host"])
    ax2.set_ylabel("management VM")
    rx = [s["rx_frames"] + s["tx_frames"] for s in samples]
    ax3.plot(t, rx, color="tab:green", label="guest frames delivered (both ways)")
    moved = [s["t_us"] for a, s in zip(samples, samples[1:]) if a["guest_on"] != s["guest_on"]]
    for x in moved:
        ax3.axvline(x, color="tab:purple", linestyle=":", label="guest now on card B")
    ax3.legend(loc="upper left")
    ax3.set_ylabel("frames")
    ax3.set_xlabel("simulated time (us)")
    for card, colour in (("A", "tab:orange"), ("B", "tab:purple")):
        xs = [p["t_ns"] / 1000 for p in pings if p["card"] == card]
        ax4.plot(xs, [1 if card == "B" else 0] * len(xs), "|", markersize=14, color=colour,
                 label=f"echo request entered the network at card {card}")
    ax4.set_yticks([0, 1], ["card A", "card B"])
    ax4.set_ylim(-0.6, 1.6)
    ax4.set_ylabel("Linux guest's pings")
    ax4.set_xlabel("simulated time of the Linux run (us): QEMU migrates the guest A -> B")
    if pings:
        ax4.legend(loc="upper left", fontsize=8)
    fig.suptitle("offcard demo: load, placement, traffic and a Linux guest's migration")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(results: dict, sim: str, cfg_key: str, short: bool) -> str:
    lines = [f"# offcard demo ({sim}, {cfg_key}{', short' if short else ''})", ""]
    for sec in SECTIONS:
        lines += [f"## {TITLES[sec]}", "", "| quantity | value |", "|---|---|"]
        blocks = []
        for k, v in results.get(sec, {}).items():
            if k in ("kind", "section", "t_us", "wall_s"):
                continue
            if isinstance(v, dict):                  # text outputs (the guests' pings)
                blocks += [f"```\n{text}\n```" for text in v.values()]
                continue
            lines.append(f"| {k.replace('_', ' ')} | {v} |")
        lines.append("")
        if blocks:
            lines += [*blocks, ""]
    lines += ["![timeline](timeline.png)", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args, sim = parse(sys.argv[1:] if argv is None else argv)
    console = Console()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    events = out / "events.jsonl"
    events.unlink(missing_ok=True)
    cfg = CardConfig()
    t0 = time.monotonic()
    try:
        res = run(sim, args.short, events, console)
    except AssertionError as e:
        console.print(f"[red]demo failed[/red]: {str(e).splitlines()[0]}")
        return 1
    evs = read_events(events)
    results = {e["section"]: e for e in evs if e["kind"] == "result"}
    samples = [e for e in evs if e["kind"] == "sample"]
    pings = [e for e in evs if e["kind"] == "ping"]
    missing = [s for s in SECTIONS if s not in results]
    if missing:
        console.print(f"[red]demo incomplete[/red]: no {', '.join(missing)} results")
        return 1
    plot(samples, results, out / "timeline.png", pings)
    rows = [{"sim": sim, "config": config_key(cfg), "section": sec,
             **{k: v for k, v in results[sec].items() if k not in ("kind", "section")}}
            for sec in SECTIONS]
    (out / "demo.json").write_text(json.dumps(
        {"generated": time.strftime("%Y-%m-%dT%H:%M:%S"), "sim": sim, "config": config_key(cfg),
         "short": args.short, "wall_s": round(time.monotonic() - t0, 1), "results": rows,
         "timeline": samples, "pings": pings}, indent=2) + "\n")
    (out / "summary.md").write_text(summary(results, sim, config_key(cfg), args.short))
    from .runner import waves_enabled
    if waves_enabled():
        for name in ("dump.fst", "offcard_twin.fst"):
            src = res.build_dir / name
            if src.exists():
                shutil.copy(src, out / ("waves.fst" if name == "dump.fst" else name))
    m, f, lx = results["migration"], results["firmware"], results["linux"]
    lm = results["linux_migration"]
    console.print(f"[bold]demo done[/bold] in {time.monotonic() - t0:.0f} s: migration blackout "
                  f"{m['blackout_us']} us, {m['frames_lost']} frames lost; management VM to the "
                  f"host in {f['to_host_us']} us, back in {f['back_to_card_us']} us; page fault "
                  f"resolved in {results['page_fault']['resolve_us']} us; Linux guests on VF1 "
                  f"and VF2: pings {lx['vf1_to_vf2_replies']} and {lx['vf1_to_peer_replies']} "
                  f"answered; QEMU migrated the Linux guest to card B in {lm['qemu_total_ms']} "
                  f"ms ({lm['qemu_downtime_ms']} ms down), {lm['pings_lost']} of "
                  f"{lm['pings_sent']} pings lost")
    console.print(f"report: {out}/summary.md, timeline.png, demo.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
