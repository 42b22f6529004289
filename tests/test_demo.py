"""``make demo`` in its short mode (what CI runs): the report holds every section with real
numbers, the timeline plot and the bench-style JSON."""

import json
import os
import re
import subprocess
import sys
import pytest
from cosim.demo import SECTIONS, TITLES
from cosim.runner import one_sim_params


@pytest.mark.parametrize("sim", one_sim_params("verilator"))
def test_demo_short(sim, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "cosim.demo", "--short", "--out", str(out)],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "SIM": sim})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (out / "summary.md").read_text()
    for sec in SECTIONS:
        body = md.split(f"## {TITLES[sec]}\n", 1)[1].split("\n## ", 1)[0]
        assert re.search(r"\| \S.* \| -?\d", body), f"section {sec} has no numbers:\n{body}"
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((out / "demo.json").read_text())
    rows = {r["section"]: r for r in doc["results"]}
    assert set(rows) == set(SECTIONS) and all(r["sim"] == sim for r in rows.values())
    assert rows["migration"]["frames_lost"] == 0 and 0 < rows["migration"]["blackout_us"] < 1000
    assert rows["firmware"]["to_host_us"] > 0 and rows["firmware"]["back_to_card_us"] > 0
    assert rows["page_fault"]["payload_exact"] is True
    assert rows["enumeration"]["functions_per_card"] == 3
    lx = rows["linux"]
    assert all(lx[f"{k}_replies"] == "3/3"
               for k in ("vf1_to_peer", "vf2_to_peer", "vf1_to_vf2", "vf2_to_vf1")), lx
    assert "3 packets transmitted, 3 packets received" in md
    lm = rows["linux_migration"]
    assert lm["outcome"] == "done" and lm["pings_sent"] == 40 and lm["pings_lost"] <= 10, lm
    assert 0 < lm["pages_written"] <= lm["pages_logged"] and lm["rarps_from_b"] > 0, lm
    assert {p["card"] for p in doc["pings"]} == {"A", "B"}, doc["pings"]
    owners = {s["owner"] for s in doc["timeline"]}
    assert owners == {"card", "host"} and {s["guest_on"] for s in doc["timeline"]} == {"A", "B"}


@pytest.mark.parametrize("argv,env", [(["--bogus"], {}), ([], {"SIM": "modelsim"})])
def test_demo_bad_arguments(argv, env):
    proc = subprocess.run([sys.executable, "-m", "cosim.demo", *argv], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env})
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
