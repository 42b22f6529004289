"""Co-simulation of the offcard: the generated Verilog under Icarus or Verilator, driven by
cocotb, with cocotbext-pcie's ``RootComplex`` as the host.

By role:

* infrastructure, what every simulation stands on:
  :mod:`~cosim.runner` (builds and runs cocotb modules under either simulator, cached builds),
  :mod:`~cosim.verilog` (the card's Verilog per configuration, cached),
  :mod:`~cosim.card_sim` (:func:`~cosim.card_sim.run_card_bench`: a cocotb module on one card),
  :mod:`~cosim.twin` (two cards in one simulation, :func:`~cosim.twin.run_twin_bench`),
  :mod:`~cosim.harness` (clock, reset, root complex, bridge and host driver of a card),
  :mod:`~cosim.bridge` (TLPs between cocotbext-pcie and the RTL stream),
  :mod:`~cosim.host` (the driver's transport on the ``RootComplex``),
  :mod:`~cosim.uplink` (the card's uplink port), :mod:`~cosim.uart_bridge` (its management
  UART, to a TCP socket or a pty), :mod:`~cosim.fabric` (the network between two cards),
  :mod:`~cosim.netpeer` (a peer answering ARP and ping), :mod:`~cosim.tlpgen` (random and
  malformed TLPs), :mod:`~cosim.vhost_user` (a vhost-user back-end),
  :mod:`~cosim.vhost_card` (a VF of the card behind it), :mod:`~cosim.vhost_soft` (a software
  virtio-net device behind it, the reference), :mod:`~cosim.lint` (Verilator lint);
* commands (``python -m ...``): :mod:`~cosim.bench` (``make bench``), :mod:`~cosim.demo`
  (``make demo``), :mod:`~cosim.serve_uart`, :mod:`~cosim.vhost_serve`, :mod:`~cosim.lint`
  (``make lint``), :mod:`~cosim.vhost_soft`, :mod:`~cosim.guest`;
* :mod:`cosim.benches`: the cocotb test modules pytest runs (``tests/test_cosim.py``);
* :mod:`cosim.scenarios`: the helpers benches and workloads share, by topic;
* :mod:`cosim.workloads`: the cocotb modules the commands run (``make bench``, ``make demo``,
  the serve commands);
* :mod:`cosim.examples`: a bench to copy, the one the README's "Write your own bench" shows;
* :mod:`cosim.guest`: the Linux guest (Debian's kernel and a busybox initramfs) under QEMU.
"""
