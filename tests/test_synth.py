"""``make synth`` (quick flow: 4 VFs, 64-bit, placed but not routed: routing alone takes
10+ minutes on this netlist, see hdl/synth.py) and ``make lint`` end to end.

The synthesis test runs YoWASP Yosys + nextpnr-ecp5 on the smallest configuration. The first
YoWASP call on a machine compiles the WebAssembly and caches it in ``~/.cache/YoWASP`` (about a
minute for Yosys); later runs reuse it.
"""

import json
import subprocess
import sys
import pytest
from cosim import lint
from hdl import synth


@pytest.fixture(scope="module")
def quick(synth_quick_run):
    """The ``--quick --place-only`` run's output folder (tests/conftest.py starts the run in
    the background when the session begins)."""
    rc, out, log = synth_quick_run
    assert rc == 0, log[-6000:]
    return out


def test_quick_synth_report(quick):
    doc = json.loads((quick / "synth.json").read_text())
    assert doc["target_mhz"] == 125 and doc["device"].startswith("LFE5UM5G-85F")
    (r,) = doc["results"]
    assert r["config"] == "vf4_w64" and r["total_vfs"] == 4 and r["data_width"] == 64
    assert r["luts"] > 100
    assert r["ffs"] > r["harness_ffs"]          # the card itself has flip-flops beyond the harness
    assert r["brams"] >= 0 and r["dsps"] >= 0
    assert 0 < r["fmax_mhz"] < 1000
    assert r["met"] == (r["fmax_mhz"] >= 125)
    assert r["routed"] is False
    assert r["constraint_mhz"] == synth.CONSTRAINT_MHZ
    # two global buffers: the clock's, and the DCCA the harness puts on the card's reset
    assert r["utilisation"]["DCCA"]["used"] == 2
    md = (quick / "synth.md").read_text()
    assert "| vf4_w64 | 4 | 64 |" in md and "pre-route estimate" in md


def test_synthesis_keeps_the_card(quick):
    # the harness must not let Yosys strip the card: its submodules' cells survive flattening
    netlist = json.loads((quick / "vf4_w64" / "out.json").read_text())
    cells = netlist["modules"]["offcard"]["cells"]
    for sub in ("card.completer.", "card.cfgspace.", "card.msix."):
        assert any(name.startswith(sub) for name in cells), sub
    # the register bus's request is copied in front of each target, and the copies stay
    # (synth.KEEP_COPIES; without it opt_merge leaves one): its function index is registered
    # once per target (the flip-flops take the name of one of the signals they drive: the
    # interconnect's, or the target's bus input)
    import re
    copies = {re.sub(r"_TRELLIS_FF.*|_\d+$", "", name) for name, c in cells.items()
              if c["type"] == "TRELLIS_FF" and re.search(r"^card\.regbus\.\S*fidx|\.bus__fidx", name)}
    assert len(copies) >= 8, sorted(copies)


@pytest.mark.parametrize("argv", [["--config", "vf3_w64"], ["--quick", "--config", "vf4_w64"],
                                  ["--bogus"], ["--freq", "0"], ["--freq", "fast"],
                                  ["--merge", "a.json", "--config", "vf4_w64"], ["--merge"]])
def test_synth_bad_args(argv):
    proc = subprocess.run([sys.executable, "-m", "hdl.synth", *argv], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1


def test_report_parser_finds_clk_and_path():
    report = {
        "utilization": {"TRELLIS_COMB": {"used": 500, "available": 83640},
                        "TRELLIS_FF": {"used": 300, "available": 83640},
                        "DP16KD": {"used": 2, "available": 208}},
        "fmax": {"$glbnet$clk$TRELLIS_IO_IN": {"achieved": 90.5, "constraint": 125}},
        "critical_paths": [
            {"from": "<async>", "to": "posedge $glbnet$clk$TRELLIS_IO_IN",
             "path": [{"delay": 1, "from": {"cell": "rst$tr_io"}, "to": {"cell": "x"}}]},
            {"from": "posedge $glbnet$clk$TRELLIS_IO_IN", "to": "posedge $glbnet$clk$TRELLIS_IO_IN",
             "path": [{"delay": 0.3, "from": {"cell": "card.a.q"}, "to": {"cell": "card.a.q"},
                       "type": "clk-to-q"},
                      {"delay": 4.0, "from": {"cell": "card.a.q"}, "to": {"cell": "card.b.d"},
                       "type": "routing"},
                      {"delay": 1.0, "from": {"cell": "card.b.d"}, "to": {"cell": "card.b.d"},
                       "type": "logic"}]},
        ],
    }
    r = synth.parse_report(report)
    assert (r["luts"], r["ffs"], r["brams"], r["dsps"]) == (500, 300, 2, 0)
    assert r["fmax_mhz"] == 90.5
    assert (r["critical_from"], r["critical_to"]) == ("card.a.q", "card.b.d")
    assert r["critical_via"] == ["card.a", "card.b"]
    assert r["critical_ns"] == 5.3 and r["critical_routing_ns"] == 4.0


def test_preroute_estimate_from_the_log():
    log = ("Info: Max frequency for clock '$glbnet$clk$TRELLIS_IO_IN': 36.40 MHz (FAIL at 125.00 MHz)\n"
           "Info: Max frequency for clock '$glbnet$clk$TRELLIS_IO_IN': 41.02 MHz (FAIL at 125.00 MHz)\n")
    report = {"utilization": {"TRELLIS_COMB": {"used": 5, "available": 9}}, "fmax": {}}
    r = synth.parse_report(report, log)
    assert r["fmax_mhz"] == 41.02 and r["luts"] == 5 and r["critical_from"] is None
    with pytest.raises(ValueError):
        synth.preroute_fmax("Info: nothing here\n")


def test_lint_passes():
    assert lint.main([]) == 0


def test_every_waiver_has_a_reason():
    waivers = lint.read_waivers()
    assert waivers and len({w.rule for w in waivers}) == len(waivers)
    assert all(len(w.reason) > 20 for w in waivers)


def test_lint_fails_on_unwaived_warnings(tmp_path):
    vlt = tmp_path / "only_declfilename.vlt"
    vlt.write_text("`verilator_config\n// DECLFILENAME: one file per configuration, module offcard\n"
                   'lint_off -rule DECLFILENAME -file "*offcard_*.v"\n')
    res = lint.lint(vlt=vlt)
    assert not res.ok and res.returncode != 0
    assert any(line.startswith("%Warning-WIDTHEXPAND") for line in res.unexplained)
    assert res.waived["DECLFILENAME"] == 1


def _result(config, luts, fmax):
    """A routed SynthResult from a made-up nextpnr report."""
    rep = synth.parse_report({
        "utilization": {"TRELLIS_COMB": {"used": luts, "available": 83640},
                        "TRELLIS_FF": {"used": 400, "available": 83640}},
        "fmax": {"$glbnet$clk$TRELLIS_IO_IN": {"achieved": fmax, "constraint": 60}},
        "critical_paths": []})
    cfg = synth.CONFIGS[config]
    return synth.SynthResult(config=config, total_vfs=cfg.total_vfs, data_width=cfg.data_width,
                             target_mhz=125.0, constraint_mhz=60.0, met=False, harness_ffs=296,
                             routed=True, elab_s=1.0, yosys_s=2.0, nextpnr_s=3.0, **rep)


def test_merge_reports_of_separate_runs(tmp_path):
    """``--merge``: reports of runs made one configuration per core, into one, in CONFIGS order."""
    for name, luts, fmax in (("vf16_w128", 900, 50.5), ("vf4_w64", 700, 61.0)):
        synth.write_reports([_result(name, luts, fmax)], tmp_path / name)
    out = tmp_path / "all"
    proc = subprocess.run([sys.executable, "-m", "hdl.synth", "--merge",
                           str(tmp_path / "vf16_w128" / "synth.json"),
                           str(tmp_path / "vf4_w64" / "synth.json"), "-o", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((out / "synth.json").read_text())["results"]
    assert [(r["config"], r["luts"], r["fmax_mhz"]) for r in rows] == \
        [("vf4_w64", 700, 61.0), ("vf16_w128", 900, 50.5)]
    # the same configuration twice, and a file that is no report: one-line errors
    (tmp_path / "junk.json").write_text("{}")
    for paths, why in (([tmp_path / "vf4_w64" / "synth.json"] * 2, "also in"),
                       ([tmp_path / "junk.json"], "not a synthesis report"),
                       ([tmp_path / "missing.json"], "not a synthesis report")):
        proc = subprocess.run([sys.executable, "-m", "hdl.synth", "--merge", *map(str, paths),
                               "-o", str(tmp_path / "x")], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 1 and why in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_bench_gathers_the_synthesis_report(tmp_path):
    """``make bench`` takes the synthesis figures from the last ``make synth`` report."""
    from cosim.bench import synthesis_rows
    synth.write_reports([_result("vf4_w64", 700, 55.5)], tmp_path)
    assert synthesis_rows(tmp_path / "nothing.json") == []
    (row,) = synthesis_rows(tmp_path / "synth.json")
    assert row["config"] == "vf4_w64" and row["luts"] == 700 and row["fmax_mhz"] == 55.5
    assert row["routed"] is True and row["constraint_mhz"] == 60.0 and row["report_generated"]
    assert "| vf4_w64 | 4 | 64 | 700 | 400 |" in (tmp_path / "synth.md").read_text()
