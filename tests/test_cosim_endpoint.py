"""The card on cocotbext-pcie's RootComplex, generated Verilog in Icarus and Verilator.

Each test runs a cocotb bench module (cosim/benches/) in a real simulator; the bench asserts,
and a failed cocotb test fails the pytest test.
"""

import pytest
from cosim.card_sim import run_card_bench
from cosim.runner import one_sim_params, sim_params
from hdl.config import CardConfig

ENUM = "cosim.benches.enumeration"


@pytest.mark.parametrize("sim", sim_params())
def test_enumeration_sriov_msix_errors(sim):
    """Default card (16 VFs, 64-bit stream): enumeration, SR-IOV, MSI-X, bad requests."""
    res = run_card_bench(sim, ENUM)
    assert res.num_tests == 8 and res.num_failed == 0


@pytest.mark.parametrize("sim", one_sim_params("verilator"))
def test_128bit_stream(sim):
    res = run_card_bench(sim, ENUM, CardConfig(data_width=128))
    assert res.num_tests == 8 and res.num_failed == 0


@pytest.mark.parametrize("sim", one_sim_params("icarus"))
def test_64_vfs(sim):
    """TotalVFs = 64: all 64 VFs enabled, each answering config and its own BAR. One
    simulator covers this configuration (``OFFCARD_EVERY_SIM=1``: both): Icarus, which compiles
    its 16 MB of Verilog in seconds where Verilator's C++ build takes over 3 minutes, for a
    20-second run."""
    res = run_card_bench(sim, ENUM, CardConfig(total_vfs=64), testcase="test_sriov_vfs")
    assert res.num_tests == 1 and res.num_failed == 0


@pytest.mark.parametrize("sim", sim_params())
def test_fuzz_1000_tlps(sim):
    """1000 hypothesis-generated random and malformed TLPs straight into the rx stream."""
    res = run_card_bench(sim, "cosim.benches.fuzz", extra_env={"OFFCARD_FUZZ_CASES": "1000"})
    assert res.num_tests == 1 and res.num_failed == 0
