"""virtio-net on every function through cocotbext-pcie's RootComplex, in both simulators."""

import pytest
from cosim.card_sim import run_card_bench
from cosim.runner import sim_width_params
from hdl.config import CardConfig


@pytest.mark.parametrize("sim,width", sim_width_params())
def test_virtio_net(sim, width):
    res = run_card_bench(sim, "cosim.benches.virtio", CardConfig(data_width=width))
    assert res.num_tests == 8 and res.num_failed == 0
