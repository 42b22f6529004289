"""The firmware in the loop: its policy file, the firmware itself (the real package, over
pyserial to the card's UART) in a thread, and the host side of the management tasks (the
agent and a user VM posting requests)."""

import threading
import time
from pathlib import Path

from cocotb.triggers import ClockCycles

from firmware.card import Card
from firmware.daemon import Firmware
from firmware.link import UartLink
from firmware.policy import load_policy
from host_driver.system.mgmt_host import HostAgent, Bar2Access, VhostRing
from cosim.harness import CLOCK_NS

THRESHOLD = 70
CLOCK_MHZ = 1000 / CLOCK_NS


def write_policy(folder, dwell_us=30.0, handoff_timeout_us=2000.0):
    path = Path(folder) / "policy.toml"
    path.write_text(f"""
[card]
clock_mhz = {CLOCK_MHZ}
[thresholds]
custom_hw = {THRESHOLD}
processor = {THRESHOLD}
memory = {THRESHOLD}
network = {THRESHOLD}
[placement]
strategy = "priority"
dwell_us = {dwell_us}
poll_us = 1.0
handoff_timeout_us = {handoff_timeout_us}
stop_timeout_us = {handoff_timeout_us}
[[task]]
name = "qos"
index = 0
priority = 1
[log]
path = "{folder}/events.jsonl"
[state]
path = "{folder}/state.json"
""")
    return path


class HostSide:
    """The host: the management agent (mailbox, host-side management VMs over PF BAR2) and a
    user VM posting management requests on its vhost ring, served by whoever owns the task."""

    def __init__(self, h, task=0):
        self.h = h
        self.task = task
        self.agent = HostAgent(Bar2Access(h.drv))
        self.ring = self.agent.vhost[task].add_ring(VhostRing(16))
        self.posted = []
        self.completed = []
        self.paused = False
        self.running = True
        self.post_every = 6          # agent steps between two requests; None: stop posting
        self._seq = 0

    def post(self):
        self._seq += 1
        word = 0x02 << 24 | self.task << 16 | self._seq    # op 2: a status request
        try:
            self.ring.post(word)
            self.posted.append(word)
        except Exception:
            self._seq -= 1                               # the ring is full: try later

    async def run(self, every_cycles=400):
        k = 0
        while self.running:
            if not self.paused:
                await self.agent.step()
                self.completed += [w for _, w in self.ring.reap()]
            if self.post_every and k % self.post_every == 0:
                self.post()
            k += 1
            await ClockCycles(self.h.dut.clk, every_cycles)

    def host_served(self):
        return [w for vm in self.agent.vms.values() for w in vm.served]


class FirmwareThread:
    """The firmware (the real package, over pyserial on the bridge's socket) in a thread."""

    def __init__(self, url, policy_path):
        self.link = UartLink(url, timeout=120)
        self.fw = Firmware(Card(self.link), load_policy(policy_path))
        self.stop = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while not self.stop.is_set():
                self.fw.poll_once()
                time.sleep(0.0005)
        except BaseException as e:               # reported by the bench
            self.error = e

    async def close(self, dut):
        self.stop.set()
        while self.thread.is_alive():
            await ClockCycles(dut.clk, 500)
        self.fw.close()
        self.link.close()
        assert self.error is None, f"firmware failed: {self.error!r}"
