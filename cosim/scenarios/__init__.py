"""Helpers the benches (:mod:`cosim.benches`) and the workloads (:mod:`cosim.workloads`) share,
one module per topic; none of them holds a cocotb test.

* :mod:`~cosim.scenarios.card`: the card up through the host driver (PF and VFs);
* :mod:`~cosim.scenarios.virtio`: a virtio-net driver on a function, frames, the switch
  counters, receiving frames;
* :mod:`~cosim.scenarios.dma`: DMA set-up (Max Payload Size, Max Read Request Size);
* :mod:`~cosim.scenarios.wire`: every memory write the card puts on the link;
* :mod:`~cosim.scenarios.mgmt`: the firmware in the loop and the host side of the management
  tasks;
* :mod:`~cosim.scenarios.migration`: two servers, a guest on server A's card and its traffic,
  the migration orchestrator (two-card top);
* :mod:`~cosim.scenarios.guest_rig`: a card serving Linux guests in QEMU over vhost-user, with
  a network peer on its uplink;
* :mod:`~cosim.scenarios.linux`: what the Linux benches measure (round trips, a transfer
  between guests, ping's summary);
* :mod:`~cosim.scenarios.smoke`: the runner's smoke counter design and its reset.
"""
