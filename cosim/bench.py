"""``make bench``: measured figures, written to ``bench.json`` and ``bench.md``.

Per simulator (``SIM`` selects, both by default) and configuration: a cold build of the card
(build time), then the enumeration + SR-IOV + MMIO workload of :mod:`cosim.workloads.perf`
(simulated cycles per wall second, counting the whole cocotb test). Nothing here is a pass/fail
check; the numbers are for the report.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hdl.config import CardConfig
from .bridge import PATHS as TLP_PATHS
from .card_sim import run_card_bench, top_for
from .runner import SIM_BUILD, selected_sims
from .verilog import REPO, config_key

CONFIGS = [CardConfig(), CardConfig(data_width=128)]


def bench_one(sim, cfg, rounds, path):
    key = f"bench_{top_for(path)}_{config_key(cfg)}"
    shutil.rmtree(SIM_BUILD / sim / key, ignore_errors=True)
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "rec.json"
        t0 = time.perf_counter()
        res = run_card_bench(sim, "cosim.workloads.perf", cfg, build_key=key, path=path,
                             extra_env={"OFFCARD_BENCH_OUT": str(out),
                                        "OFFCARD_BENCH_ROUNDS": str(rounds)})
        total = time.perf_counter() - t0
        rec = json.loads(out.read_text())
    rec.update({"sim": sim, "config": config_key(cfg), "tlp_path": path,
                "total_vfs": cfg.total_vfs,
                "data_width": cfg.data_width, "build_s": round(res.build_s, 2),
                "test_process_s": round(res.test_s, 2), "total_s": round(total, 2)})
    return rec


def bench_dma(sim, cfg, path):
    """DMA throughput rows and page-fault latency rows (:mod:`cosim.workloads.perf_dma`)."""
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "dma.json"
        run_card_bench(sim, "cosim.workloads.perf_dma", cfg, path=path,
                       extra_env={"OFFCARD_BENCH_OUT": str(out)})
        rec = json.loads(out.read_text())
    for r in rec["dma"] + rec["page_faults"]:
        r.update({"sim": sim, "config": config_key(cfg), "tlp_path": path})
    return rec["dma"], rec["page_faults"]


def bench_virtio(sim, cfg, path):
    """Guest-to-guest virtio-net rows (:mod:`cosim.workloads.perf_virtio`)."""
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "virtio.json"
        run_card_bench(sim, "cosim.workloads.perf_virtio", cfg, path=path,
                       extra_env={"OFFCARD_BENCH_OUT": str(out)})
        rows = json.loads(out.read_text())
    for r in rows:
        r.update({"sim": sim, "config": config_key(cfg), "tlp_path": path})
    return rows


def bench_mgmt(sim, cfg):
    """Firmware placement latency and QoS accuracy rows (:mod:`cosim.benches.mgmt`)."""
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "mgmt.json"
        for tc in ("test_telemetry_and_qos", "test_firmware_placement"):
            run_card_bench(sim, "cosim.benches.mgmt", cfg, testcase=tc,
                           extra_env={"OFFCARD_BENCH_OUT": str(out)})
        rec = json.loads(out.read_text())
    for r in rec["placement_latency"] + rec["qos"]:
        r.update({"sim": sim, "config": config_key(cfg)})
    return rec["placement_latency"], rec["qos"]


def bench_migration(sim, cfg, path):
    """Live migration between two cards (:mod:`cosim.benches.live_migration` on the two-card
    top): blackout, pause, the VF state's save and restore time."""
    from .twin import run_twin_bench
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "migration.json"
        res = run_twin_bench(sim, "cosim.benches.live_migration", cfg, path=path,
                             testcase="test_live_migration_under_traffic",
                             extra_env={"OFFCARD_BENCH_OUT": str(out)})
        rec = json.loads(out.read_text())
    rec.update({"sim": sim, "config": config_key(cfg), "tlp_path": path,
                "sim_ns_per_wall_s": sim_ns_per_wall_s(res.results_xml)})
    return rec


def bench_linux(sim, cfg, workload="perf_linux"):
    """Two Linux guests (QEMU) on VF1 and VF2 (:mod:`cosim.workloads.perf_linux`), or
    ``workload="perf_qemu_migration"``: one migrated by QEMU from VF1 to VF2, or
    ``"perf_qemu_twin"``: one migrated from card A to card B (the two-card top)."""
    from .twin import run_twin_bench
    run = run_twin_bench if workload == "perf_qemu_twin" else run_card_bench
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "linux.json"
        run(sim, f"cosim.workloads.{workload}", cfg,
            extra_env={"OFFCARD_BENCH_OUT": str(out)}, timeout_s=1800)
        rec = json.loads(out.read_text())
    rec.update({"sim": sim, "config": config_key(cfg)})
    return rec


def sim_ns_per_wall_s(results_xml):
    """Simulated ns per wall second over the tests of one cocotb results file."""
    root = ElementTree.parse(results_xml).getroot()
    ns = wall = 0.0
    for tc in root.iter("testcase"):
        props = {p.get("name"): p.get("value") for p in tc.iter("property")}
        ns += float(props.get("sim_time_duration", 0))
        wall += float(tc.get("time", 0))
    return round(ns / wall) if wall else None


def add_table(console, md, title, cols, rows):
    table = Table(title=title)
    for c in cols:
        table.add_column(c)
    md += ["", f"**{title}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [str(r.get(c, "")) for c in cols]
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    console.print(table)


def synthesis_rows(path: Path = REPO / "synth_out" / "synth.json"):
    """The figures of the last ``make synth``, gathered, not re-run (routing the three
    configurations takes the better part of an hour); none when there is no report."""
    if not path.exists():
        return []
    doc = json.loads(path.read_text())
    rows = []
    for r in doc["results"]:
        rows.append({
            "tool": "yosys + nextpnr-ecp5", "config": r["config"], "device": doc["device"],
            "luts": r["luts"], "ffs": r["ffs"], "brams": r["brams"], "dsps": r["dsps"],
            "fmax_mhz": r["fmax_mhz"], "routed": r["routed"],
            "constraint_mhz": r.get("constraint_mhz"), "target_mhz": r["target_mhz"],
            "critical_ns": r.get("critical_ns"), "critical_routing_ns": r.get("critical_routing_ns"),
            "report_generated": doc.get("generated", ""),
        })
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m cosim.bench")
    ap.add_argument("--rounds", type=int, default=50, help="MMIO rounds over PF + 16 VFs")
    ap.add_argument("-o", "--output", default=str(REPO / "bench.json"))
    ap.add_argument("--paths", default=",".join(TLP_PATHS),
                    help="TLP paths to measure side by side, comma-separated: tlp (whole TLPs "
                         "through the TLP shim) and/or beat (a beat at a time); default: both")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        print("error: --rounds must be at least 1", file=sys.stderr)
        return 2
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    bad = [p for p in paths if p not in TLP_PATHS]
    if bad or not paths:
        print(f"error: --paths: {', '.join(bad) or 'none given'}: choose from "
              f"{', '.join(TLP_PATHS)}", file=sys.stderr)
        return 2
    console = Console()
    rows = []
    dma_rows = []
    fault_rows = []
    virtio_rows = []
    placement_rows = []
    qos_rows = []
    migration_rows = []
    linux_rows = []
    qemu_mig_rows = []
    for sim in selected_sims():
        for cfg in CONFIGS:
            for path in paths:
                what = f"{sim} {config_key(cfg)} ({path} path)"
                console.print(f"[bold]bench[/bold] {what} ...")
                rows.append(bench_one(sim, cfg, args.rounds, path))
                console.print(f"[bold]bench[/bold] {what} DMA and page faults ...")
                d, f = bench_dma(sim, cfg, path)
                dma_rows += d
                fault_rows += f
                console.print(f"[bold]bench[/bold] {what} virtio-net ...")
                virtio_rows += bench_virtio(sim, cfg, path)
                if cfg == CONFIGS[0]:
                    console.print(f"[bold]bench[/bold] {what} live migration ...")
                    migration_rows.append(bench_migration(sim, cfg, path))
            if cfg == CONFIGS[0]:
                console.print(f"[bold]bench[/bold] {sim} {config_key(cfg)} firmware and QoS ...")
                p, q = bench_mgmt(sim, cfg)
                placement_rows += p
                qos_rows += q
                console.print(f"[bold]bench[/bold] {sim} {config_key(cfg)} Linux guests ...")
                linux_rows.append(bench_linux(sim, cfg))
                console.print(f"[bold]bench[/bold] {sim} {config_key(cfg)} QEMU live migration ...")
                qemu_mig_rows.append({"route": "VF1 -> VF2",
                                      **bench_linux(sim, cfg, "perf_qemu_migration")})
                console.print(f"[bold]bench[/bold] {sim} {config_key(cfg)} QEMU live migration "
                              f"between two cards ...")
                qemu_mig_rows.append(bench_linux(sim, cfg, "perf_qemu_twin"))
    report = {"generated": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine_cores": os.cpu_count(),
              "enumeration_mmio": rows, "dma": dma_rows, "page_faults": fault_rows,
              "virtio_net": virtio_rows, "placement_latency": placement_rows,
              "qos": qos_rows, "migration": migration_rows, "linux_guests": linux_rows,
              "qemu_migration": qemu_mig_rows, "synthesis": synthesis_rows()}
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    md = []
    add_table(console, md, "enumeration + SR-IOV + MMIO",
              ["sim", "config", "tlp_path", "build_s", "sim_cycles", "wall_s", "cycles_per_s", "mmio_ops"], rows)
    add_table(console, md, "DMA (MPS 256, MRRS 512)",
              ["sim", "config", "tlp_path", "path", "direction", "bytes", "e2e_bytes_per_clk",
               "stream_bytes_per_clk", "stream_fraction_of_limit", "workload_cycles_per_s"],
              dma_rows)
    add_table(console, md, "I/O page faults (1 KiB write to an absent page, card clocks)",
              ["sim", "config", "tlp_path", "fault", "raise_clk", "host_clk", "resolve_clk", "total_clk"],
              fault_rows)
    add_table(console, md, "virtio-net guest to guest (VF1 -> VF2)",
              ["sim", "config", "tlp_path", "mode", "tx_descs", "host_read_ns", "frame_bytes", "frames",
               "frames_per_wall_s", "payload_bytes_per_clk", "clocks_per_frame", "sim_us",
               "traps"], virtio_rows)
    add_table(console, md, "firmware: threshold crossing to control moved (card time; UART at "
              f"{CardConfig().uart_divisor} clocks per bit)",
              ["sim", "config", "resource", "threshold_to_owner_us", "uart_round_trips"],
              placement_rows)
    add_table(console, md, "QoS token bucket on the virtio transmit path (uplink, 512 B frames)",
              ["sim", "config", "limit_bytes_per_clk", "limited_bytes_per_clk", "error_pct",
               "unlimited_alone_bytes_per_clk", "unlimited_beside_bytes_per_clk", "isolation_pct"],
              qos_rows)
    add_table(console, md, "live migration between two cards under traffic both ways "
              "(simulated us; target: blackout under 1000)",
              ["sim", "config", "tlp_path", "sim_ns_per_wall_s", "blackout_us", "paused_us",
               "save_us", "restore_us", "memory_bytes", "forwarded", "frames"], migration_rows)
    add_table(console, md, "Linux guests (QEMU, virtio_net) on VF1 and VF2: boot, ping to the "
              "uplink peer, 256 KiB VF1 -> VF2 over TCP",
              ["sim", "config", "guest_boot_s", "ping_replies", "ping_rtt_wall_ms",
               "ping_rtt_sim_us_median", "ping_rtt_sim_us_max", "transfer_exact",
               "transfer_wall_s", "frames_per_wall_s", "payload_bytes_per_clk"], linux_rows)
    add_table(console, md, "QEMU's live migration of a Linux guest between two VFs of a card "
              "and between two cards (seed-004 orchestrator), pinging every 100 ms (QEMU: wall "
              "ms; card pause: simulated us)",
              ["sim", "config", "route", "qemu_total_ms", "qemu_downtime_ms", "card_pause_us",
               "pages_written", "pages_logged", "pings_sent", "pings_lost", "forwarded_by_a"],
              qemu_mig_rows)
    if report["synthesis"]:
        add_table(console, md, "synthesis (gathered from synth_out/synth.json, the last "
                  "`make synth`)",
                  ["tool", "config", "luts", "ffs", "brams", "dsps", "fmax_mhz", "routed",
                   "constraint_mhz", "critical_ns", "critical_routing_ns", "report_generated"],
                  report["synthesis"])
    else:
        md += ["", "**synthesis**: no `synth_out/synth.json`; run `make synth` first."]
    Path(args.output).with_suffix(".md").write_text("\n".join(md).lstrip() + "\n")
    console.print(f"wrote {args.output} and {Path(args.output).with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
