"""VF state save / restore on the card through RootComplex, in both simulators."""

import pytest
from cosim.card_sim import run_card_bench
from cosim.runner import sim_params
from hdl.config import CardConfig


@pytest.mark.parametrize("sim", sim_params())
def test_vf_save_restore(sim):
    res = run_card_bench(sim, "cosim.benches.migrate", CardConfig())
    assert res.num_failed == 0 and res.num_tests == 2, res
