"""Two cards in one simulation, each on its own RootComplex and host memory, in both simulators."""

import pytest
from cosim.runner import sim_params
from cosim.twin import run_twin_bench
from hdl.config import CardConfig


@pytest.mark.parametrize("sim", sim_params())
def test_twin(sim):
    res = run_twin_bench(sim, "cosim.benches.twin", CardConfig())
    assert res.num_failed == 0 and res.num_tests == 3, res
