"""Smoke test of cosim.runner: a tiny Amaranth counter under each selected simulator."""

import pytest
from cosim.runner import SIM_BUILD, SIMS, cocotb_tests, run_cocotb, sim_params
from cosim.verilog import write_if_changed as _write_if_changed
from pathlib import Path

BENCH = "cosim.benches.smoke_counter"
TOP = "smoke_counter"


@pytest.fixture(scope="module")
def counter_v() -> Path:
    from cosim.scenarios.smoke import smoke_counter_verilog

    return _write_if_changed(SIM_BUILD / "verilog" / f"{TOP}.v", smoke_counter_verilog(TOP))


@pytest.mark.parametrize("sim", sim_params())
def test_smoke_counter(sim, counter_v):
    res = run_cocotb(sim, TOP, [counter_v], BENCH, "smoke_counter", timeout_s=120)
    assert res.testcases == cocotb_tests(BENCH) and res.num_failed == 0
    # A second run reuses the build (the stamp matches).
    again = run_cocotb(sim, TOP, [counter_v], BENCH, "smoke_counter", testcase="holds_when_disabled")
    assert not again.rebuilt and again.testcases == ["holds_when_disabled"]


@pytest.mark.parametrize("sim", sim_params([s for s in SIMS if s == "icarus"]))
def test_runner_reports_failed_testcases(sim, counter_v):
    with pytest.raises(AssertionError, match="failed cocotb tests: deliberately_fails"):
        run_cocotb(sim, TOP, [counter_v], "cosim.benches.smoke_fail", "smoke_counter")


@pytest.mark.parametrize("sim", sim_params([s for s in SIMS if s == "verilator"]))
def test_verilator_vlt_instead_of_public_flat_rw(sim, counter_v, tmp_path):
    """Only the signals the bench touches are public (a .vlt file), not --public-flat-rw."""
    vlt = _write_if_changed(SIM_BUILD / "verilog" / f"{TOP}.vlt",
                            "`verilator_config\n"
                            f'public_flat_rw -module "{TOP}" -var "clk"\n'
                            f'public_flat_rw -module "{TOP}" -var "rst"\n'
                            f'public_flat_rw -module "{TOP}" -var "en"\n'
                            f'public_flat_rw -module "{TOP}" -var "count"\n')
    res = run_cocotb("verilator", TOP, [counter_v], BENCH, "smoke_counter_vlt", vlt=vlt,
                     timeout_s=120)
    assert res.testcases == cocotb_tests(BENCH) and res.num_failed == 0
