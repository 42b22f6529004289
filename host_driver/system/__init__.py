"""Models of the host system around the driver: what a hypervisor, a host OS and a data centre
do with the card. The driver itself (``host_driver/``) is what would run against real hardware;
these are the surroundings the tests and benches need.

* :mod:`.hypervisor` -- guests bound to VFs (direct or trapped doorbells), the host's own path
* :mod:`.cgroup`     -- cgroup v2 CPU weights and quotas, for the host-side management VMs
* :mod:`.mgmt_host`  -- the host's management agent: starts and stops management VMs, serves
  the tasks moved to the host
* :mod:`.vf_save`    -- VF save / restore (the modified fast save) with a runtime repository
* :mod:`.migration`  -- the live-migration orchestrator between servers (seed 004)
* :mod:`.live`       -- the orchestrator's servers, guests and network on real simulated cards
"""
