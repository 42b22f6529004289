"""offcard gateware: an Amaranth 0.5 model of a virtualization offload card.

One component per concern, grouped by subsystem; a subsystem imports only the modules at this
level and the subsystems below it (``pcie`` < ``dma`` < ``iommu`` < ``virtio``; ``mgmt`` sits on
``pcie``), and only :mod:`hdl.card` knows which blocks talk to each other:

* :mod:`hdl.config`  -- :class:`CardConfig`, the elaboration parameters
* :mod:`hdl.memmap`  -- the card's internal memory map (staging and frame buffers)
* :mod:`hdl.iface`   -- the signatures and layouts the subsystems meet at
* :mod:`hdl.pcie`    -- the transaction layer: TLP stream, RX router, TX arbiter, completer,
  configuration space (SR-IOV, ARI, MSI-X), BAR decode, register bus, function registers, MSI-X
* :mod:`hdl.dma`     -- DMA read and write channels, descriptor queues, card memory
* :mod:`hdl.iommu`   -- device TLB, page-table walker, I/O page faults
* :mod:`hdl.virtio`  -- the virtio-pci transport, the virtio-net engine and switch
* :mod:`hdl.mgmt`    -- card registers, management block, telemetry, QoS, the UART
* :mod:`hdl.card`    -- the top level: instantiates the blocks and connects them
* :mod:`hdl.synth`   -- ECP5 synthesis and place-and-route (``make synth``)

The register map the host sees (BAR offsets, record formats, protocols) is not here: it is the
Amaranth-free package :mod:`regmap`, shared with the host driver and the firmware.

``python -m hdl --help`` writes Verilog for a chosen configuration.
"""

from .config import CardConfig

__all__ = ["CardConfig"]
