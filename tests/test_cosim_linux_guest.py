"""Linux guests (Debian's kernel in QEMU) on the card's VFs through our vhost-user back-end:
the RTL walks virtio_net's own rings in the guest's RAM, in both simulators."""

import pytest

from hdl.params import CardConfig
from cosim.card_sim import run_card_bench
from cosim.runner import sim_params, one_sim_params


@pytest.mark.parametrize("sim", sim_params())
def test_linux_guest_pings_peer(sim):
    res = run_card_bench(sim, "cosim.benches.linux_guest", CardConfig(),
                         testcase="test_guest_pings_uplink_peer", timeout_s=900)
    assert res.num_failed == 0


@pytest.mark.parametrize("sim", one_sim_params("verilator"))
def test_linux_two_guests(sim):
    res = run_card_bench(sim, "cosim.benches.linux_guest", CardConfig(),
                         testcase="test_two_guests", timeout_s=1500)
    assert res.num_failed == 0
