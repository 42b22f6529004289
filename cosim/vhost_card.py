"""The simulated card as a vhost-user back-end: a QEMU guest's virtio-net rings on a card VF.

This is what the host kernel's vhost-vdpa does for vDPA hardware, done inside the simulation:
QEMU keeps the device's PCI side, its configuration and the control queue; for each chosen VF a
:class:`cosim.vhost_user.VhostUserServer` takes QEMU's memory table and data rings, and
:class:`VfBackend` hands them to the VF:

* **memory**: each region of the guest's RAM (QEMU's shared memfd, mapped by the server) is
  registered in the ``RootComplex``'s host memory at a bus window of the VF's own
  (:func:`guest_window`: ``GUEST_WINDOW_BASE + fidx * GUEST_WINDOW_SIZE`` plus the
  guest-physical address), and the VF's IOMMU domain (PF BAR2, :class:`host_driver.iommu.Iommu`)
  maps each guest-physical page to it, as vhost-vdpa programs the platform IOMMU: the card
  walks Linux's rings and moves Linux's buffers by the guest-physical addresses Linux wrote,
  its DMA landing in the guest's RAM with no copy. The RootComplex's own memory pool stays at
  0..2 GiB (rings and page tables of the host driver live there);
* **rings**: ``SET_FEATURES`` / ``SET_VRING_NUM`` / ``ADDR`` / ``BASE`` / ``ENABLE`` become a
  virtio bring-up of the VF through config and MMIO requests, as a driver does
  (:meth:`host_driver.virtio.VirtioNetDriver.negotiate` / ``attach_ring`` / ``driver_ok``); a
  non-zero ring base is restored through PF BAR2 (:class:`host_driver.vf_state.CardVfState`);
* **notifications**: a kick eventfd becomes a write of the VF's notify register; the VF's MSI-X
  message for a queue becomes a write of that queue's call eventfd (QEMU raises the guest's
  interrupt); NEEDS_RESET is reported on the rings' error eventfds;
* **stop**: ``GET_VRING_BASE`` stops the VF (``MigRegs`` stop, wait until idle) and answers
  with the device's own ``last_avail`` index; a closed socket resets that VF's virtio state
  only (device status 0) and takes its guest memory away (the domain's pages unmapped, the
  windows unregistered);
* **dirty log** (QEMU's live migration): QEMU's log (``SET_LOG_BASE``, shared memory) is
  registered in the ``RootComplex``'s host memory at a window of the VF's own
  (:func:`log_window`), and while QEMU asks for ``VHOST_F_LOG_ALL`` the card's dirty-page
  logger for the VF (:class:`host_driver.dirty_log.DirtyLog`) marks that bitmap itself, with
  its bit 0 at the VF's guest window: every page the card writes into the guest's memory (used
  rings, received frames) is marked by the card's own DMA, not by this back-end.

* **announcement** (the end of a migration): QEMU's ``SEND_RARP`` for the guest that just
  arrived on a VF makes the card broadcast a RARP from the guest's MAC through the PF's own
  virtio-net queues (:meth:`VhostCard.announce`), as a hypervisor does, so that the network's
  switches learn the guest's new port at once instead of at its next frame.

Nothing here runs per cycle: :class:`FdPump` polls the file descriptors between simulated
intervals while the card works, and blocks in ``select`` while the card is idle and the bench
waits for the outside world (a guest booting, a ping in flight on the guest's side).
"""

import logging
import os
import struct
import time

import cocotb
from cocotb.queue import Queue
from cocotb.triggers import Timer
from cocotb.utils import get_sim_time
from cocotbext.axi.address_space import MemoryRegion as RcRegion

from regmap import MigRegs as MG, VirtioRegs as V
from host_driver.dirty_log import DirtyLog
from host_driver.iommu import Iommu
from host_driver.vf_state import CardVfState
from host_driver.virtio import (VirtioNetDriver, DirectAccess, HostMemory, VirtioError, RX_QUEUE,
                                TX_QUEUE)

from .vhost_user import (VhostUserDevice, VhostUserServer, Reactor, Deferred, ProtocolError,
                         DEFAULT_PROTOCOL_FEATURES, PROTOCOL_F_LOG_SHMFD, PROTOCOL_F_RARP,
                         VHOST_F_LOG_ALL)

__all__ = ["FdPump", "VfBackend", "VhostCard", "guest_window", "log_window", "rarp",
           "GUEST_WINDOW_BASE", "GUEST_WINDOW_SIZE", "LOG_WINDOW_BASE", "LOG_WINDOW_SIZE"]

log = logging.getLogger("cosim.vhost_card")

GUEST_WINDOW_BASE = 0x40_0000_0000      # 256 GiB: above everything the RootComplex decodes
GUEST_WINDOW_SIZE = 0x1_0000_0000       # 4 GiB of guest-physical space per function
PAGE = 4096


LOG_WINDOW_BASE = 0x30_0000_0000        # QEMU's dirty logs, one window per function
LOG_WINDOW_SIZE = 0x1000_0000           # 256 MiB: the log of up to 8 TiB of guest memory


ETH_RARP = 0x8035


def rarp(mac: bytes) -> bytes:
    """The RARP request a hypervisor broadcasts for a guest that moved (``mac`` asks for its
    own address: sender and target hardware address ``mac``, protocol addresses 0), 60 bytes."""
    body = struct.pack(">HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 3, mac, bytes(4), mac, bytes(4))
    return (b"\xff" * 6 + mac + ETH_RARP.to_bytes(2, "big") + body).ljust(60, b"\0")


def guest_window(fidx: int) -> int:
    """Bus address of guest-physical address 0 of the guest served by function ``fidx``."""
    return GUEST_WINDOW_BASE + fidx * GUEST_WINDOW_SIZE


def log_window(fidx: int) -> int:
    """Bus address of the dirty log of the guest served by function ``fidx``."""
    return LOG_WINDOW_BASE + fidx * LOG_WINDOW_SIZE


class FdPump:
    """Runs a :class:`cosim.vhost_user.Reactor` from inside the simulation.

    Every ``poll_ns`` of simulated time it serves the file descriptors that are ready, without
    waiting. While :meth:`until` waits for the outside world and ``idle()`` says the card has
    nothing to do, it waits in ``select`` (up to ``idle_wait_s`` of wall time at a stretch)
    instead of spinning the simulator."""

    def __init__(self, reactor: Reactor, idle, poll_ns=1_000, idle_wait_s=0.02):
        self.reactor = reactor
        self.idle = idle
        self.poll_ns = poll_ns
        self.idle_wait_s = idle_wait_s
        self.waiting = 0                 # callers of until() (and serve-forever users)
        self.blocked_s = 0.0             # wall time spent waiting in select
        self._task = None

    def start(self):
        if self._task is None:
            self._task = cocotb.start_soon(self._run())
        return self

    async def _run(self):
        while True:
            self.reactor.poll(0)
            if self.waiting and self.idle():
                t0 = time.monotonic()
                self.reactor.poll(self.idle_wait_s)
                self.blocked_s += time.monotonic() - t0
            await Timer(self.poll_ns, "ns")

    async def until(self, pred, timeout_s, what):
        """Wait (wall time) until ``pred()`` is true; raises ``TimeoutError`` naming ``what``."""
        deadline = time.monotonic() + timeout_s
        self.waiting += 1
        try:
            while not pred():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{what}: not after {timeout_s} s of wall time")
                await Timer(self.poll_ns, "ns")
        finally:
            self.waiting -= 1

    async def serve_forever(self):
        """Serve until cancelled (``python -m cosim.vhost_serve``): always idle-blocking."""
        self.waiting += 1
        while True:
            await Timer(100 * self.poll_ns, "ns")


class _Jobs:
    """One worker that runs a card's management operations in order (they share PF BAR2's
    select registers); callbacks that must not block queue coroutines here."""

    def __init__(self):
        self.q = Queue()
        self.busy = False
        cocotb.start_soon(self._run())

    def put(self, name, coro_fn):
        self.q.put_nowait((name, coro_fn))

    @property
    def idle(self):
        return not self.busy and self.q.empty()

    async def _run(self):
        while True:
            name, fn = await self.q.get()
            self.busy = True
            try:
                await fn()
            except Exception:
                log.exception("card job %s failed", name)
            finally:
                self.busy = False


class VfBackend(VhostUserDevice):
    """One VF of the card behind one vhost-user socket. ``card`` is the :class:`VhostCard`,
    ``vf`` the :class:`host_driver.offcard.OffcardFunction`; ``on_event(text)`` gets a line
    per guest event (connect, memory, rings up, stop, disconnect, NEEDS_RESET)."""

    def __init__(self, card, vf, features, on_event=None):
        self.card = card
        self.vf = vf
        self.fidx = vf.index
        self._features = features
        self.on_event = on_event or (lambda text: None)
        self.drv = VirtioNetDriver(DirectAccess(vf), vf, mem=None)
        self.acked = 0
        self.memory = None
        self.regions = []                # (bus base, RootComplex region) registered for it
        self.log = None                  # QEMU's dirty log (cosim.vhost_user.DirtyLog)
        self.log_region = None           # ... registered at log_window(fidx)
        self.logging = False             # the card marks the log (VHOST_F_LOG_ALL acked)
        self.log_on_ns = None            # simulated time the card's logger went on
        self.stop_ns = None              # ... GET_VRING_BASE began stopping the VF
        self.live_ns = None              # ... the VF last ran the guest's rings
        self.mapped = []                 # (gpa, size) mapped in the domain
        self.vrings = {}
        self.live = False                # the VF runs the guest's rings
        self.stopped = False             # GET_VRING_BASE stopped it
        self.generation = 0              # bumped per connection: stale jobs do nothing
        self.announced = 0               # SEND_RARPs from QEMU
        self.on_stopped = None           # called when GET_VRING_BASE has stopped the VF
        self.kicks = {RX_QUEUE: 0, TX_QUEUE: 0}
        self.calls = {RX_QUEUE: 0, TX_QUEUE: 0}
        self._kick_pending = set()
        self.server = None
        self.trace = []                  # (simulated ns, "kick" | "irq", queue): for latencies

    def __repr__(self):
        return f"<VfBackend VF{self.fidx}>"

    # ---- vhost-user callbacks (never block; card work goes to the job worker) --------------
    def features(self):
        return self._features | 1 << VHOST_F_LOG_ALL

    def num_queues(self):
        return 2

    def set_features(self, features):
        self.acked = features & ~(1 << VHOST_F_LOG_ALL)
        self._log_state(bool(features >> VHOST_F_LOG_ALL & 1))

    def set_log_base(self, log):
        """QEMU's log replaces the previous one at the VF's log window; the card's logger is
        pointed at it (if logging is on) before the reply goes back."""
        if log.size > LOG_WINDOW_SIZE:
            raise ProtocolError(f"SET_LOG_BASE: a log of {log.size:#x} bytes; the VF's log "
                                f"window holds {LOG_WINDOW_SIZE:#x}")
        self._unregister_log()
        self.log = log
        self.log_region = RcRegion(log.size, mem=log.view())
        self.card.h.rc.mem_address_space.register_region(self.log_region, log_window(self.fidx))
        self.on_event(f"VF{self.fidx}: dirty log of {log.pages} pages at bus "
                      f"{log_window(self.fidx):#x}")
        self._log_state(self.logging, force=True)

    def _log_state(self, on, force=False):
        if on == self.logging and not force:
            return
        self.logging = on
        gen = self.generation
        self.card.jobs.put(f"VF{self.fidx} dirty log {'on' if on else 'off'}",
                           lambda: self._apply_log(gen))

    def set_mem_table(self, memory):
        """Register the guest's RAM in the RootComplex's host memory at the VF's window (the
        old table's windows go first), and queue the domain update."""
        self._unregister()
        self.memory = memory
        base = guest_window(self.fidx)
        space = self.card.h.rc.mem_address_space
        top = 0
        for r in memory.regions:
            if r.gpa + r.size > GUEST_WINDOW_SIZE:
                raise ProtocolError(f"guest memory region at {r.gpa:#x}+{r.size:#x} is beyond "
                                    f"the {GUEST_WINDOW_SIZE >> 30} GiB a VF's window holds")
            region = RcRegion(r.size, mem=memory.view(r.gpa, r.size))
            space.register_region(region, base + r.gpa)
            self.regions.append((base + r.gpa, region))
            top = max(top, r.gpa + r.size)
        spans = [(r.gpa, r.size) for r in memory.regions]
        gen = self.generation
        self.card.jobs.put(f"VF{self.fidx} memory", lambda: self._map(gen, spans, top))
        self.on_event(f"VF{self.fidx}: guest memory {top >> 20} MiB in {len(spans)} regions at "
                      f"bus {base:#x}")

    def vring_ready(self, index, vring):
        self.vrings[index] = vring
        if all(i in self.vrings and self.vrings[i].started for i in (RX_QUEUE, TX_QUEUE)):
            gen = self.generation
            self.card.jobs.put(f"VF{self.fidx} start", lambda: self._start(gen))

    def get_vring_base(self, index):
        d = Deferred()
        gen = self.generation
        self.card.jobs.put(f"VF{self.fidx} stop ring {index}", lambda: self._stop(gen, index, d))
        return d

    def kick(self, index):
        self.kicks[index] += 1
        if self.live and index not in self._kick_pending:
            self._kick_pending.add(index)
            cocotb.start_soon(self._notify(index))

    def send_rarp(self, mac):
        """QEMU announces the guest that just migrated onto this VF: the card broadcasts a
        RARP from its MAC (:meth:`VhostCard.announce`), so the network learns where it is."""
        self.announced += 1
        self.card.jobs.put(f"VF{self.fidx} announce", lambda: self.card.announce(mac, self))

    def disconnected(self):
        """The front-end went away: the VF's windows go now (the server unmaps the memory
        after this returns); its reset and the domain's pages go through the job worker."""
        self._unregister()
        self._unregister_log()
        self.logging = False
        self.memory = None
        self.live = False
        self.vrings = {}
        self.generation += 1
        gen = self.generation
        self.card.jobs.put(f"VF{self.fidx} reset", lambda: self._reset(gen))
        self.on_event(f"VF{self.fidx}: front-end disconnected; the VF's virtio state is reset")

    # ---- card work ---------------------------------------------------------------------------
    def _unregister_region(self, region):
        space = self.card.h.rc.mem_address_space
        space.regions = [e for e in space.regions if e[3] is not region]

    def _unregister(self):
        for base, region in self.regions:
            self._unregister_region(region)
        self.regions = []

    def _unregister_log(self):
        if self.log_region is not None:
            self._unregister_region(self.log_region)
            self.log_region = None
        self.log = None

    async def _apply_log(self, gen):
        """The card's logger for the VF: on, at QEMU's log with bit 0 at the VF's guest window
        (GPA 0), or off."""
        if gen != self.generation:
            return
        dirty = self.card.dirty
        if self.logging and self.log is not None:
            await dirty.start(self.fidx, guest_window(self.fidx), self.log.pages,
                              bitmap=log_window(self.fidx))
            self.log_on_ns = get_sim_time("ns")
            self.on_event(f"VF{self.fidx}: the card logs every page it writes")
        elif await dirty.drop(self.fidx):
            self.log_on_ns = None
            self.on_event(f"VF{self.fidx}: dirty logging off")

    async def _map(self, gen, spans, top):
        if gen != self.generation:
            return
        await self.card.map_guest(self, spans, top)

    async def _notify(self, index):
        self._kick_pending.discard(index)
        if self.live:
            self.trace.append((get_sim_time("ns"), "kick", index))
            await self.drv.notify(index)

    async def _start(self, gen):
        """Bring the VF up on the guest's rings: features, both queues at the guest-physical
        addresses QEMU gave, the device's indices restored when the rings do not start at 0,
        DRIVER_OK, one look at each queue (kicks before now are not repeated)."""
        if gen != self.generation:
            return
        rings = {i: self.vrings[i] for i in (RX_QUEUE, TX_QUEUE)}
        self.live = False
        if not self.drv.structures:
            await self.drv.probe()
        await self.drv.negotiate(self.acked & self._features)
        for i, v in rings.items():
            await self.drv.attach_ring(i, v.num, v.desc, v.avail, v.used)
        st = self.card.vf_state
        used = {i: int.from_bytes(self.memory.read(v.used + 2, 2), "little")
                for i, v in rings.items()}
        if any(v.base for v in rings.values()) or any(used.values()) or self.stopped:
            await st.quiesce(self.vf)
            await st.write_indices(self.vf, {q: (rings[q].base, used[q])
                                             for q in (RX_QUEUE, TX_QUEUE)})
        await self.drv.driver_ok()
        if self.stopped or any(v.base for v in rings.values()) or any(used.values()):
            await st.resume(self.vf)
        self.stopped = False
        self.live = True
        self.live_ns = get_sim_time("ns")
        for i in rings:
            await self.drv.notify(i)
        self.on_event(f"VF{self.fidx}: rings up (RX {rings[0].num} at {rings[0].desc:#x}, "
                      f"TX {rings[1].num} at {rings[1].desc:#x}, features "
                      f"{self.drv.features:#x})")

    async def _stop(self, gen, index, d):
        """Stop the VF (both rings: they stop together on the card) and answer with ring
        ``index``'s ``last_avail``."""
        if gen != self.generation or not self.live and not self.stopped:
            d.resolve(self.vrings[index].base if index in self.vrings else 0)
            return
        st = self.card.vf_state
        if not self.stopped:
            self.stop_ns = get_sim_time("ns")
            await st.quiesce(self.vf)
            self.stopped = True
            self.live = False
            if self.on_stopped is not None:
                self.on_stopped()
        value, _ = await st.read_indices(self.vf, index)
        self.on_event(f"VF{self.fidx}: ring {index} stopped at avail index {value}")
        d.resolve(value)

    async def _reset(self, gen):
        """Stop the VF and wait until the engine holds none of its work (what was under way
        when the memory went away ends there, possibly in NEEDS_RESET), then reset its virtio
        state (device status 0: NEEDS_RESET goes too), let it run, drop its pages."""
        if gen != self.generation:
            return
        self.live = False
        self.stopped = False
        st = self.card.vf_state
        await st.quiesce(self.vf)
        await self.card.dirty.drop(self.fidx)
        await self.drv.reset()
        await st._sel(self.vf)
        await self.card.h.drv.mgmt_write(MG.CTRL, 0)
        await self.card.unmap_guest(self)

    # ---- interrupts from the card --------------------------------------------------------------
    def msi(self, q):
        """The VF's MSI-X for queue ``q`` arrived at the root complex."""
        self.calls[q] += 1
        self.trace.append((get_sim_time("ns"), "irq", q))
        v = self.vrings.get(q)
        if v is not None and self.live:
            v.call()

    def needs_reset(self):
        self.on_event(f"VF{self.fidx}: the card set NEEDS_RESET (a bad ring)")
        for v in self.vrings.values():
            if v.err_fd is not None:
                try:
                    os.write(v.err_fd, (1).to_bytes(8, "little"))
                except OSError:
                    pass


class VhostCard:
    """The card of harness ``h`` serving VFs ``vfs`` (enabled, with MSI-X set up by this
    class) on vhost-user sockets ``paths`` (one per VF), in ``reactor``."""

    def __init__(self, h, vfs, paths, reactor, on_event=None):
        self.h = h
        self.reactor = reactor
        self.jobs = _Jobs()
        self.vf_state = CardVfState(h.drv)
        self.iommu = Iommu(h.drv)
        self.dirty = DirtyLog(h.drv)
        self.domains = {}
        self.backends = {}
        self.servers = {}
        self.on_event = on_event or (lambda text: log.info("%s", text))
        self._paths = dict(zip((vf.index for vf in vfs), paths))
        self._vfs = vfs
        self.pf_net = None               # the PF's virtio-net driver, for announcements
        self.host_switch = None          # the host's switch on the PF, when it runs one
        self.announcements = []          # (simulated ns, MAC) of each RARP broadcast

    async def start(self):
        """Read each VF's device features, set up its MSI-X, open its socket."""
        for vf in self._vfs:
            probe = VirtioNetDriver(DirectAccess(vf), vf, mem=None)
            await probe.probe()
            # (QEMU keeps the control queue; this back-end serves one queue pair, so the
            # VF's control queue and multiqueue are not offered on)
            features = await probe.device_features() & ~(1 << V.F_NET_CTRL_VQ | 1 << V.F_NET_MQ)
            be = VfBackend(self, vf, features, self.on_event)
            be.drv.structures = probe.structures
            if not vf.msix_vectors:
                await vf.setup_msix()
            for q in (RX_QUEUE, TX_QUEUE):
                self.h.t.add_msi_callback(be.drv.vector_of(q), lambda be=be, q=q: be.msi(q))
            self.h.t.add_msi_callback(vf.msix_vectors[0], lambda be=be: self._config_irq(be))
            server = VhostUserServer(self._paths[vf.index], be, protocol_features=(
                DEFAULT_PROTOCOL_FEATURES | 1 << PROTOCOL_F_LOG_SHMFD | 1 << PROTOCOL_F_RARP))
            server.attach(self.reactor)
            be.server = server
            self.backends[vf.index] = be
            self.servers[vf.index] = server
            self.on_event(f"VF{vf.index}: serving vhost-user on {self._paths[vf.index]}")
        return self

    async def announce(self, mac, be=None):
        """Broadcast a RARP from ``mac`` on the uplink, through the PF's own virtio-net queues
        (the host switch's, :attr:`host_switch`, when the host runs one; else brought up here
        the first time), as a hypervisor does for a guest that moved here: the card's switch
        floods it to the uplink (and to the other functions), and the network's switches learn
        the guest's new port."""
        frame = rarp(mac)
        if self.host_switch is not None:
            self.host_switch.send_soon(frame)
        else:
            if self.pf_net is None:
                pf = self.h.drv.pf
                d = VirtioNetDriver(DirectAccess(pf), pf, HostMemory(self.h.t), queue_size=8)
                await d.probe()
                await d.bring_up()
                self.pf_net = d
            await self.pf_net.reap_tx()
            await self.pf_net.send(frame)
        self.announcements.append((get_sim_time("ns"), mac))
        self.on_event(f"{'VF%d: ' % be.fidx if be else ''}RARP from {mac.hex(':')} "
                      f"broadcast for the migrated guest")

    def _config_irq(self, be):
        self.jobs.put(f"VF{be.fidx} status", lambda: self._check(be))

    async def _check(self, be):
        try:
            await be.drv.check_status()
        except VirtioError:
            be.needs_reset()

    @property
    def idle(self):
        return self.jobs.idle

    async def map_guest(self, be, spans, top):
        """The VF's domain maps every guest-physical page of ``spans`` to its window."""
        pages = (top + PAGE - 1) // PAGE
        dom = self.domains.get(be.fidx)
        if dom is not None and dom.pages < pages:
            await self.iommu.detach(be.fidx)
            dom = None
        if dom is None:
            dom = self.domains[be.fidx] = await self.iommu.attach(be.fidx, be.fidx, pages)
        await self.unmap_guest(be)
        for gpa, size in spans:
            await dom.map(gpa, size, bus=guest_window(be.fidx) + gpa)
        be.mapped = list(spans)

    async def unmap_guest(self, be):
        """The VF's domain keeps no page of a guest that is gone (every DMA of it faults)."""
        for gpa, size in be.mapped:
            await self.iommu.unmap(be.fidx, gpa, size)
        be.mapped = []

    def close(self):
        for s in self.servers.values():
            s.close()
