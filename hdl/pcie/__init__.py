"""The PCIe transaction layer of the card: what every other subsystem sends and receives through.

* :mod:`.tlp`          -- the TLP stream signature and header field helpers
* :mod:`.rx_router`    -- requests to the completer, completions to their requester by tag
* :mod:`.tx_arbiter`   -- the packet-granular arbiter of every TLP source
* :mod:`.completer`    -- config and memory requests, completions, UR / CA, error strobes
* :mod:`.config_space` -- type-0 configuration space of the PF and every VF (PCIe, MSI-X, ARI,
  SR-IOV capabilities)
* :mod:`.bar_decode`   -- PF and VF BAR address decode
* :mod:`.regbus`       -- the register bus's pipeline stages
* :mod:`.func_regs`    -- the small per-function register file (ID, scratch, interrupt trigger)
* :mod:`.msix`         -- MSI-X tables, PBA and the message generator
"""
