"""The management block through the UART (pins, framed protocol) and PF BAR2 (RootComplex),
the firmware against the simulated card over pyserial, in both simulators."""

import pytest

from hdl.params import CardConfig
from cosim.card_sim import run_card_bench
from cosim.runner import sim_params


@pytest.mark.parametrize("sim", sim_params())
def test_mgmt(sim):
    res = run_card_bench(sim, "cosim.benches.mgmt", CardConfig())
    assert res.num_failed == 0 and res.num_tests == len(res.testcases) >= 2, res
