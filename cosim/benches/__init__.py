"""The cocotb test modules pytest runs: each is a row of the table in ``tests/test_cosim.py``
(through :func:`cosim.card_sim.run_card_bench` or :func:`cosim.twin.run_twin_bench`) or, for the
runner's own smoke benches, ``tests/test_runner_smoke.py``. A bench imports what it shares from
:mod:`cosim.scenarios`, never from another bench."""
