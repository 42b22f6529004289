"""cocotb modules that the commands run, not pytest: the ``make bench`` workloads (``perf``,
``perf_dma``, ``perf_virtio``, ``perf_linux``, ``perf_qemu_migration``, run by :mod:`cosim.bench`), the ``make demo``
story (``demo``, ``demo_linux``, run by :mod:`cosim.demo`) and the cards that wait for a user
(``serve`` for :mod:`cosim.serve_uart`, ``vhost_serve`` for :mod:`cosim.vhost_serve`). They
report through files named by environment variables rather than assert on figures."""

import json
import os

__all__ = ["bench_out"]


def bench_out(record):
    """Write a workload's figures (JSON) where :mod:`cosim.bench` asked for them
    (``OFFCARD_BENCH_OUT``); nothing when run by hand."""
    path = os.environ.get("OFFCARD_BENCH_OUT")
    if path:
        with open(path, "w") as f:
            json.dump(record, f)
