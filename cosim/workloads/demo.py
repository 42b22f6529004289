"""``make demo``: the whole story on the two-card top (``cosim.twin``), one cocotb test.

Two servers, each with its card on its own RootComplex: both enumerate and enable their VFs;
a guest on server A's VF1 exchanges frames with a peer outside; a DMA of VF2 hits a page that
is not present and the host resolves the I/O page fault; server A's card load rises until the
firmware (over pyserial to the card's UART) moves the management VM to the host, and back when
it falls; the guest migrates to server B's card under traffic.

The bench writes what happens to the JSON-lines file named by ``OFFCARD_DEMO_EVENTS``:
``phase`` events (for the progress display of :mod:`cosim.demo`), ``sample`` events (the
timeline: load, placement, traffic) and one ``result`` event per section with its numbers.
``OFFCARD_DEMO_SHORT=1`` shortens the traffic phases (CI).
"""

import json
import os
import random
import tempfile
import time
from pathlib import Path

import cocotb

from hdl.config import CardConfig
from regmap import DescStatus, MgmtBlockRegs as R, Owner
from host_driver.dma import DmaQueue
from host_driver.iommu import Iommu, FaultService, MAPPED, PAGE_SIZE as PAGE
from cosim.scenarios.migration import Rig
from cosim.scenarios.mgmt import FirmwareThread, HostSide, THRESHOLD, write_policy
from cosim.scenarios.virtio import counters
from cosim.uart_bridge import UartBridge, UartPhy


class Events:
    def __init__(self, path, clock):
        self.f = open(path, "a") if path else None
        self.clock = clock
        self.t_wall = time.monotonic()

    def emit(self, kind, **fields):
        if self.f is not None:
            rec = {"kind": kind, "t_us": round(self.clock.now_us(), 3),
                   "wall_s": round(time.monotonic() - self.t_wall, 2), **fields}
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()


class Timeline:
    """Samples load, placement and traffic every ``every_us`` of simulated time."""

    def __init__(self, rig, ev, every_us):
        self.rig, self.ev, self.every_us = rig, ev, every_us
        self.load = 0
        self.running = True

    async def run(self):
        a = self.rig.servers["A"]
        vm = self.rig.vm
        while self.running:
            owner = await a.drv.mgmt_read(R.OWNER)
            self.ev.emit("sample", load_pct=self.load, owner="host" if owner == Owner.HOST
                         else "card", guest_on=vm.host.name,
                         rx_frames=len(vm.rx.deliveries), tx_frames=len(vm.tx.deliveries))
            await self.rig.clock.sleep_us(self.every_us)


@cocotb.test()
async def test_demo(dut):
    short = os.environ.get("OFFCARD_DEMO_SHORT") == "1"
    traffic_us = 30 if short else 200
    t_wall = time.monotonic()
    rig = await Rig().build(dut)
    ev = Events(os.environ.get("OFFCARD_DEMO_EVENTS"), rig.clock)
    ha = rig.h["A"]
    a, b, vm = rig.servers["A"], rig.servers["B"], rig.vm
    ev.emit("phase", name="enumerate", state="done")
    ev.emit("result", section="enumeration", servers=2,
            functions_per_card=1 + len(a.slots), vendor_device="1af4:1041",
            vfs_enabled={name: len(s.slots) for name, s in rig.servers.items()})
    tl = Timeline(rig, ev, every_us=2 if short else 5)
    sampler = cocotb.start_soon(tl.run())

    # ---- guests with traffic ----
    ev.emit("phase", name="traffic", state="start")
    await rig.clock.sleep_us(traffic_us)
    ev.emit("phase", name="traffic", state="done")
    c = await counters(ha)
    ev.emit("result", section="traffic", guest_rx_frames=len(vm.rx.deliveries),
            guest_tx_frames=len(vm.tx.deliveries), card_a_tx_frames=c["TX_FRAMES"],
            card_a_rx_frames=c["RX_FRAMES"], sim_us=round(traffic_us, 1))

    # ---- an I/O page fault: VF2's DMA writes to a page not present ----
    ev.emit("phase", name="page_fault", state="start")
    iommu = Iommu(ha.drv)
    fs = FaultService(iommu)
    await fs.setup(3)                                   # the PF's vectors 0..2 are virtio's
    vf2 = a.vf(2)
    dom = await iommu.attach(vf2.index, vm=5, pages=16)
    dom.allow(0, 16 * PAGE)
    q = await DmaQueue(vf2, entries=16).setup()
    pfq = await DmaQueue(ha.drv.pf, entries=16).setup()
    scratch = (ha.t.alloc_host_mem(2 * PAGE) + PAGE - 1) & ~(PAGE - 1)
    data = bytes(random.Random(5).getrandbits(8) for _ in range(1500))
    await ha.t.host_write(scratch, data)
    await pfq.transfer(scratch, 0x2000, len(data), to_host=False)    # into card memory
    msi0 = ha.t.msi_count(fs.vector)
    t0 = ha.t.now_ns()
    idx = await q.post(0x5120, 0x2000, len(data), to_host=True, irq=False)
    assert await ha.t.wait_msi(fs.vector, msi0 + 1, 200_000), "no fault interrupt"
    t_raised = ha.t.now_ns()
    (flt,) = await fs.poll()
    assert await fs.resolve(flt) == MAPPED
    assert await q.wait(idx) == DescStatus.DONE
    t_done = ha.t.now_ns()
    assert await dom.read(0x5120, len(data)) == data
    ev.emit("phase", name="page_fault", state="done")
    ev.emit("result", section="page_fault", iova=hex(flt.iova), vf=vf2.index,
            bytes=len(data), raise_us=round((t_raised - t0) / 1000, 2),
            resolve_us=round((t_done - t_raised) / 1000, 2), payload_exact=True)

    # ---- card load: the firmware moves the management VM to the host and back ----
    ev.emit("phase", name="firmware", state="start")
    phy = UartPhy(dut, CardConfig().uart_divisor, prefix="a_")
    bridge = UartBridge(phy, "tcp")
    folder = tempfile.mkdtemp(prefix="offcard-demo-fw-")
    host = HostSide(ha)
    host_job = cocotb.start_soon(host.run())
    fw = FirmwareThread(bridge.url, write_policy(folder))
    util = ha.port("util")
    moves = {}
    try:
        for pct in (20, 40, 60, THRESHOLD, THRESHOLD + 10):   # rising load on the card
            tl.load = pct
            util.value = pct                              # the custom-hardware resource
            await rig.clock.sleep_us(10)
        t0 = rig.clock.now_us()
        while await ha.drv.mgmt_read(R.OWNER) != Owner.HOST:
            assert rig.clock.now_us() - t0 < 3000, "the management VM did not move to the host"
            await rig.clock.sleep_us(2)
        moves["to_host_us"] = round(rig.clock.now_us() - t0, 2)
        await rig.clock.sleep_us(20)
        tl.load = 30
        util.value = 30
        t0 = rig.clock.now_us()
        while await ha.drv.mgmt_read(R.OWNER) != Owner.CARD:
            assert rig.clock.now_us() - t0 < 3000, "the management VM did not come back"
            await rig.clock.sleep_us(2)
        moves["back_to_card_us"] = round(rig.clock.now_us() - t0, 2)
        host.post_every = None
    finally:
        host.running = False
        await fw.close(dut)
        await host_job
        bridge.close()
    ev.emit("phase", name="firmware", state="done")
    ev.emit("result", section="firmware", threshold_pct=THRESHOLD, peak_load_pct=THRESHOLD + 10,
            requests_posted=len(host.posted), requests_completed=len(host.completed),
            uart_round_trips=fw.link.round_trips, **moves)

    # ---- live migration of the guest to server B's card ----
    ev.emit("phase", name="migration", state="start")
    res = await rig.orchestrator().migrate()
    assert res.outcome.value == "done", res.reason
    await rig.clock.sleep_us(traffic_us / 2)
    await rig.stop()
    tl.running = False
    await sampler
    problems = rig.lost_or_duplicated()
    assert not problems, problems
    # (the blackout is read now that traffic has gone on through card B for a while)
    assert res.blackout_us is not None, "no frame of the guest went through card B"
    ev.emit("phase", name="migration", state="done")
    ev.emit("result", section="migration", vm=res.vm, source=res.source, target=res.target,
            blackout_us=round(res.blackout_us, 2), paused_us=round(res.paused_us, 2),
            forwarded=res.forwarded, frames_lost=0, frames_duplicated=0,
            source_vf_free=1 in a.free_vfs(), guest_on=vm.host.name,
            guest_rx_frames=len(vm.rx.deliveries), guest_tx_frames=len(vm.tx.deliveries))
    sim_ns = ha.t.now_ns()
    wall = time.monotonic() - t_wall
    ev.emit("result", section="simulation", sim_us=round(sim_ns / 1000, 1),
            wall_s=round(wall, 1), cycles_per_wall_s=round(sim_ns / 4 / wall))
