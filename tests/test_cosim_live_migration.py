"""Live migration of a guest between two cards, each on its own RootComplex, in one simulation
(cosim.benches.live_migration on the two-card top, cosim.twin), in both simulators."""

import pytest
from cosim.runner import sim_params
from cosim.twin import run_twin_bench


@pytest.mark.parametrize("sim", sim_params())
def test_live_migration(sim):
    res = run_twin_bench(sim, "cosim.benches.live_migration", timeout_s=900)
    assert res.num_failed == 0 and res.num_tests == 3, res
