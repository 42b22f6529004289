"""``make demo``'s Linux phase: two Debian guests (QEMU) on VF1 and VF2 of a card, their
virtio_net rings served by the RTL through our vhost-user back-end; they ping each other and
the peer on the card's uplink. Events go to ``OFFCARD_DEMO_EVENTS`` as in
:mod:`cosim.workloads.demo` (a ``phase`` event and one ``result`` event, section ``linux``)."""

import json
import os
import time

import cocotb

from cosim.scenarios.guest_rig import CardRig, PEER_IP, vf_ip
from cosim.scenarios.linux import sim_rtts_us, ping_summary
from cosim.scenarios.virtio import counters


def emit(kind, **fields):
    path = os.environ.get("OFFCARD_DEMO_EVENTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"kind": kind, "t_us": round(cocotb.utils.get_sim_time("ns")
                                                            / 1000, 3), **fields}) + "\n")


@cocotb.test()
async def test_demo_linux(dut):
    count = 3 if os.environ.get("OFFCARD_DEMO_SHORT") == "1" else 10
    emit("phase", name="linux", state="start")
    t0 = time.monotonic()
    rig = await CardRig(dut, [1, 2]).start()
    try:
        g1 = await rig.boot(1)
        g2 = await rig.boot(2)
        outputs, res = {}, {}
        be1 = rig.card.backends[1]
        for src, dst, name in ((1, PEER_IP, "vf1_to_peer"), (2, PEER_IP, "vf2_to_peer"),
                               (1, vf_ip(2), "vf1_to_vf2"), (2, vf_ip(1), "vf2_to_vf1")):
            mark = len(be1.trace)
            rc, out = await rig.run(src, f"ping -c {count} -i 0.2 -W 5 {dst}", timeout_s=120)
            if name == "vf1_to_peer":
                trace = be1.trace[mark:]
            assert rc == 0, out
            tx, rx, avg = ping_summary(out)
            assert tx == rx == count, out
            outputs[name] = f"VF{src}$ ping -c {count} {dst}\n{out.strip()}"
            res[f"{name}_replies"] = f"{rx}/{tx}"
            res[f"{name}_rtt_wall_ms"] = avg
        rtt = sim_rtts_us(trace)
        ctr = await counters(rig.h)
    finally:
        rig.close()
    emit("phase", name="linux", state="done")
    emit("result", section="linux", guests=2, kernel=rig_kernel(),
         boot_vf1_s=round(g1.boot_s, 1), boot_vf2_s=round(g2.boot_s, 1),
         sim_rtt_vf1_us_median=round(sorted(rtt)[len(rtt) // 2], 2) if rtt else None,
         card_tx_frames=ctr["TX_FRAMES"], card_rx_frames=ctr["RX_FRAMES"],
         wall_s=round(time.monotonic() - t0, 1), **res, ping_output=outputs)


def rig_kernel():
    from cosim.guest.image import ensure_image
    return ensure_image().kernel_version
