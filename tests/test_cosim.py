"""The cocotb benches of cosim/benches/ on the card, in Icarus and Verilator, from one table.

A row names the bench module, the card configuration, the simulators, a testcase filter, extra
environment, the top (one card, or two cards in one simulation: ``cosim.twin``) and a timeout.
:func:`test_bench` runs a row and requires that every cocotb test the bench defines ran and
passed, and nothing else: the tests that ran (``res.testcases``) are those found in the bench's
source (:func:`cosim.runner.cocotb_tests`), or those the row's filter selects. A test added to a
bench is run and checked without touching this file.

Simulators (:mod:`cosim.runner`): ``sim_params()`` runs the row in every selected simulator;
``sim_width_params()`` also the 128-bit data path, in one simulator; ``one_sim_params(x)`` runs
a variant in ``x`` only (every selected one with ``OFFCARD_EVERY_SIM=1``). Test ids read
``bench-<simulator>[-<data width>]``, e.g. ``test_bench[dma-verilator-128]``.
"""

from dataclasses import dataclass, field, replace
from typing import Mapping

import pytest
from cosim.card_sim import run_card_bench
from cosim.runner import cocotb_tests, one_sim_params, sim_params, sim_width_params
from cosim.twin import run_twin_bench
from hdl.config import CardConfig


@dataclass(frozen=True)
class Bench:
    name: str                    # the test id's first part
    module: str                  # the cocotb test module
    sims: list                   # pytest params: sim_params(), sim_width_params(), one_sim_params(x)
    cfg: CardConfig = CardConfig()
    testcase: str | None = None  # only these cocotb tests (cocotb's filter)
    env: Mapping[str, str] = field(default_factory=dict)
    twin: bool = False           # two cards in one simulation (cosim.twin)
    timeout_s: float = 1200      # wall seconds: a hang's bound, with room for the run's other
                                 # workers and the background synthesis sharing the cores


BENCHES = [
    Bench("dma", "cosim.benches.dma", sim_width_params()),
    # the default card (16 VFs, 64-bit stream): enumeration, SR-IOV, MSI-X, bad requests
    Bench("enumeration", "cosim.benches.enumeration", sim_params()),
    Bench("enumeration_w128", "cosim.benches.enumeration", one_sim_params("verilator"),
          CardConfig(data_width=128)),
    # TotalVFs = 64: all 64 VFs enabled, each answering config and its own BAR. Icarus covers
    # it: it compiles the 16 MB of Verilog in seconds where Verilator's C++ build takes over 3
    # minutes, for a 20-second run
    Bench("enumeration_vf64", "cosim.benches.enumeration", one_sim_params("icarus"),
          CardConfig(total_vfs=64), testcase="test_sriov_vfs"),
    # 1000 hypothesis-generated random and malformed TLPs straight into the rx stream
    Bench("fuzz", "cosim.benches.fuzz", sim_params(), env={"OFFCARD_FUZZ_CASES": "1000"}),
    Bench("iommu", "cosim.benches.iommu", sim_width_params()),
    # Linux guests (Debian's kernel in QEMU) on the VFs through our vhost-user back-end
    Bench("linux_guest_ping", "cosim.benches.linux_guest", sim_params(),
          testcase="test_guest_pings_uplink_peer", timeout_s=1500),
    Bench("linux_two_guests", "cosim.benches.linux_guest", one_sim_params("verilator"),
          testcase="test_two_guests", timeout_s=1800),
    # QEMU's own live migration of a running guest from VF1's QEMU to VF2's and back, the card
    # logging the pages it writes into QEMU's dirty log; a destination killed in mid-migration
    Bench("linux_migration", "cosim.benches.linux_guest", one_sim_params("verilator"),
          testcase="test_qemu_live_migration", timeout_s=1800),
    # QEMU migrates a running Linux guest from card A's VF1 to card B's and back (two cards,
    # each on its own RootComplex, their uplinks on one switch with the peer)
    Bench("linux_twin_migration", "cosim.benches.linux_twin", one_sim_params("verilator"),
          twin=True, timeout_s=1800),
    # live migration of a guest between two cards, each on its own RootComplex
    Bench("live_migration", "cosim.benches.live_migration", sim_params(), twin=True,
          timeout_s=1500),
    # the management block through the UART and PF BAR2, the firmware over pyserial
    Bench("mgmt", "cosim.benches.mgmt", sim_params()),
    # VF state save / restore
    Bench("migrate", "cosim.benches.migrate", sim_params()),
    # two cards in one simulation, each on its own RootComplex and host memory
    Bench("twin", "cosim.benches.twin", sim_params(), twin=True),
    Bench("virtio", "cosim.benches.virtio", sim_width_params()),
]


def bench_params(benches=BENCHES):
    """One ``pytest.param(bench, sim, cfg)`` per row and simulator (and data width), with the
    simulator param's id and marks (``sim``)."""
    out = []
    for b in benches:
        for p in b.sims:
            sim, *width = p.values
            cfg = replace(b.cfg, data_width=width[0]) if width else b.cfg
            out.append(pytest.param(b, sim, cfg, id=f"{b.name}-{p.id}", marks=p.marks))
    return out


@pytest.mark.parametrize("bench,sim,cfg", bench_params())
def test_bench(bench, sim, cfg):
    want = cocotb_tests(bench.module, bench.testcase)
    run = run_twin_bench if bench.twin else run_card_bench
    res = run(sim, bench.module, cfg, testcase=bench.testcase, extra_env=dict(bench.env),
              timeout_s=bench.timeout_s)
    assert res.num_failed == 0, res
    missing = [t for t in want if t not in res.testcases]
    extra = [t for t in res.testcases if t not in want]
    assert sorted(res.testcases) == sorted(want), \
        f"{bench.module}: not run {missing}, not defined {extra}, ran {res.testcases}"
