"""The simulated card serving vhost-user sockets for guests started by hand; run by
``python -m cosim.vhost_serve`` (``OFFCARD_VHOST_VFS``, ``OFFCARD_VHOST_DIR``, ``OFFCARD_SERVE_S``
wall seconds)."""

import os
import time

import cocotb

from cosim.guest_rig import CardRig, PEER_IP


@cocotb.test()
async def test_serve_vhost(dut):
    vfs = [int(x) for x in os.environ["OFFCARD_VHOST_VFS"].split(",")]

    def say(text):
        print(f"offcard: {text}", flush=True)
    rig = await CardRig(dut, vfs, sock_dir=os.environ["OFFCARD_VHOST_DIR"],
                        on_event=say).start()
    say(f"peer on the uplink: {PEER_IP}; serving until interrupted")
    deadline = time.monotonic() + float(os.environ.get("OFFCARD_SERVE_S", "3600"))
    try:
        await rig.pump.until(lambda: time.monotonic() > deadline, 1e9, "serving")
    finally:
        rig.close()
