"""The simulated card serving vhost-user sockets for guests started by hand; run by
``python -m cosim.vhost_serve`` (``OFFCARD_VHOST_VFS``, ``OFFCARD_VHOST_DIR``, ``OFFCARD_SERVE_S``
wall seconds)."""

import os
import time

import cocotb

from cosim.scenarios.guest_rig import CardRig, PEER_IP


@cocotb.test()
async def test_serve_vhost(dut):
    vfs = [int(x) for x in os.environ["OFFCARD_VHOST_VFS"].split(",")]

    events = os.environ.get("OFFCARD_VHOST_EVENTS")

    def say(text):
        line = f"offcard: {text}\n"
        print(line, end="", flush=True)
        if events:
            with open(events, "a") as f:
                f.write(line)
    rig = await CardRig(dut, vfs, sock_dir=os.environ["OFFCARD_VHOST_DIR"],
                        on_event=say).start()
    say(f"peer on the uplink: {PEER_IP}; serving until interrupted")
    deadline = time.monotonic() + float(os.environ.get("OFFCARD_SERVE_S", "3600"))
    try:
        await rig.pump.until(lambda: time.monotonic() > deadline, 1e9, "serving")
    finally:
        rig.close()
