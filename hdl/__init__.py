"""offcard gateware: an Amaranth 0.5 model of a virtualization offload card.

The design is split one component per concern:

* :mod:`hdl.tlp`          -- the transaction-layer stream signature and header field helpers
* :mod:`regmap`       -- :class:`CardConfig`, the elaboration parameters and address map
* :mod:`hdl.config_space` -- type-0 configuration space of the PF and every VF (PCIe, MSI-X,
  ARI and SR-IOV capabilities)
* :mod:`hdl.bar_decode`   -- PF and VF BAR address decode
* :mod:`hdl.request`      -- the completer: config / memory requests, completions, UR/CA, error counters
* :mod:`hdl.func_regs`    -- the small per-function register file (ID, scratch, interrupt trigger)
* :mod:`hdl.msix`         -- MSI-X tables, PBA and the message generator
* :mod:`hdl.mgmt_regs`    -- PF BAR2 card registers (identification, error counters)
* :mod:`hdl.arbiter`      -- packet-granular TLP stream arbiter
* :mod:`hdl.card`         -- the top level that wires it all together

``python -m hdl --help`` writes Verilog for a chosen configuration.
"""

from .config import CardConfig

__all__ = ["CardConfig"]
