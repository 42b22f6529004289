"""The DMA engine: channels that move bytes between host and card memory, and the descriptor
queues that drive them.

* :mod:`.common` -- card memory, TLP sizing helpers
* :mod:`.read`   -- host -> card: MemRd split by MRRS, 32 tags, completions realigned by bytes
* :mod:`.write`  -- card -> host: MemWr split by MPS, realigned by bytes
* :mod:`.mux`    -- one request / response server shared by two clients
* :mod:`.queue`  -- per-function descriptor rings in host memory
"""
