"""cocotb modules that the commands run, not pytest: the ``make bench`` workloads (``perf``,
``perf_dma``, ``perf_virtio``, ``perf_linux``, run by :mod:`cosim.bench`), the ``make demo``
story (``demo``, ``demo_linux``, run by :mod:`cosim.demo`) and the cards that wait for a user
(``serve`` for :mod:`cosim.serve_uart`, ``vhost_serve`` for :mod:`cosim.vhost_serve`). They
report through files named by environment variables rather than assert on figures."""
