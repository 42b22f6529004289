"""Live migration on real cards: what :class:`host_driver.system.migration.MigrationOrchestrator`
needs beyond its model when the servers hold cards and the VM a running guest.

* :class:`CardServer`: a server whose VF slots are VFs of its card. The VF state moves through
  :class:`host_driver.vf_state.CardVfState` (the MAC address goes with it); a state imported
  from another server takes this host's own MSI-X vectors (interrupt remapping).
* :class:`HostSwitch`: the server's software switch on its PF. The card gives the PF every
  uplink frame for no function and every frame for a stopped function (``NetRegs.CTRL``
  DEFAULT_PF). For a guest being migrated away those are held, then forwarded, each inside an
  Ethernet frame of type :data:`FWD_ETHERTYPE`, to the target host's switch, which hands them
  to the guest's new VF through its own card as soon as that VF runs.
* :class:`GuestVm`: a VM whose memory (:class:`GuestMemory`) and virtio-net driver are real.
  Pausing it parks the guest's loops; the final copy moves its memory to the target host and
  points its driver at the replacement VF, whose state arrives separately.
* :class:`AnnouncingNetwork`: the orchestrator's view of the network, telling the real one
  (a callback) where a VM now is, as a hypervisor's RARP after a migration does.
* :class:`TransportClock`: the orchestrator's clock on the transport's (simulated) time.

The guest's memory sits at the same bus address on both hosts and its VF uses no IOMMU
domain, so the ring addresses in the VF state stay valid on the target (with a domain they
would be I/O virtual addresses, mapped anew on the target).
"""

from __future__ import annotations

from typing import Callable

from .migration import Clock, Network, Server, Vm
from ..vf_state import CardVfState
from ..virtio import VirtioNetDriver

__all__ = ["FWD_ETHERTYPE", "TransportClock", "GuestMemory", "CardServer", "HostSwitch",
           "GuestVm", "AnnouncingNetwork"]

#: A frame forwarded between two hosts' switches: the original frame is the payload.
#: (IEEE 802 local experimental EtherType 2; the other, 0x88B5, is the benches' traffic.)
FWD_ETHERTYPE = 0x88B6


class TransportClock:
    """:class:`host_driver.system.migration.Clock` on a transport's time (the simulator's)."""

    def __init__(self, t) -> None:
        self.t = t

    def now_us(self) -> float:
        return self.t.now_ns() / 1000

    async def sleep_us(self, us: float) -> None:
        if us > 0:
            await self.t.sleep_ns(max(1, round(us * 1000)))


class GuestMemory:
    """A VM's memory: ``size`` bytes at bus address ``base`` of the host it runs on, handed out
    by a bump allocator (:class:`host_driver.virtio.DmaMemory`). :meth:`move_to` copies what
    was handed out to the same address of another host and goes on there."""

    def __init__(self, t, base: int, size: int) -> None:
        self.t, self.base, self.size = t, base, size
        self.used = 0

    async def alloc(self, size: int, align: int = 16) -> int:
        start = -(-self.used // align) * align
        if start + size > self.size:
            raise MemoryError(f"guest memory: {size} bytes asked, "
                              f"{self.size - start} left of {self.size}")
        self.used = start + size
        return self.base + start

    async def read(self, addr: int, n: int) -> bytes:
        return await self.t.host_read(addr, n)

    async def write(self, addr: int, data: bytes) -> None:
        await self.t.host_write(addr, data)

    async def move_to(self, t) -> int:
        """Copy the memory in use to ``t``'s host; returns the bytes copied."""
        if t is not self.t:
            await t.host_write(self.base, await self.t.host_read(self.base, self.used))
            self.t = t
        return self.used


class CardServer(Server):
    """A server and its card: VF slot *n* is the card's function *n* (``vfs``, the
    :class:`host_driver.offcard.OffcardFunction` objects of its enabled VFs)."""

    def __init__(self, name: str, drv, vfs, load: float = 0.0) -> None:
        self.state = CardVfState(drv)
        super().__init__(name, len(vfs), load, card=self.state,
                         handles={fn.index: fn for fn in vfs})
        self.drv = drv
        self.t = drv.t
        self.switch: HostSwitch | None = None
        self.timings: list[tuple[str, int, float]] = []   # (operation, VF, simulated us)

    def vf(self, index: int):
        return self.slots[index].handle

    def _timed(self, op: str, vf: int, t0: float) -> None:
        self.timings.append((op, vf, (self.t.now_ns() - t0) / 1000))

    async def quiesce(self, vf: int) -> None:
        t0 = self.t.now_ns()
        await super().quiesce(vf)
        self._timed("quiesce", vf, t0)

    async def export_state(self, vf: int) -> bytes:
        t0 = self.t.now_ns()
        blob = await super().export_state(vf)
        self._timed("export", vf, t0)
        return blob

    async def import_state(self, vf: int, blob: bytes) -> None:
        t0 = self.t.now_ns()
        fn = self.vf(vf)
        if not fn.msix_vectors:
            await fn.setup_msix()            # this host's vectors for the VF
        self.running.discard(vf)
        await self.state.import_state(fn, blob, rehome_msix=True)
        self._timed("import", vf, t0)

    async def resume(self, vf: int) -> None:
        t0 = self.t.now_ns()
        await super().resume(vf)
        self._timed("resume", vf, t0)


class HostSwitch:
    """The host's switch on its PF (module docstring). ``pf`` is the PF's brought-up
    :class:`VirtioNetDriver`; ``mac`` its address; ``vm_of`` maps a guest's MAC address to its
    VM (the hosts' shared inventory). Run :meth:`run` as a task; :meth:`stop` ends it."""

    def __init__(self, server: CardServer, pf: VirtioNetDriver, vm_of: dict[bytes, "GuestVm"],
                 poll_ns: int = 1000) -> None:
        self.server, self.pf, self.vm_of = server, pf, vm_of
        self.mac = pf.mac
        self.poll_ns = poll_ns
        server.switch = self
        self.held: list[bytes] = []          # for a guest leaving this host, no rule yet
        self.inbound: list[bytes] = []       # forwarded here, for a guest's VF not yet running
        self.forwarded: list[bytes] = []     # every frame this host forwarded (bench checks)
        self.delivered: list[bytes] = []     # forwarded frames handed to a guest here
        self.dropped: list[bytes] = []
        self.outbound: list[bytes] = []      # frames of the host's own (send_soon)
        self._running = True

    def stop(self) -> None:
        self._running = False

    def send_soon(self, frame: bytes) -> None:
        """Send ``frame`` from the host (e.g. a RARP announcing a guest that arrived) at the
        loop's next turn: the PF's queues have one user, this loop."""
        self.outbound.append(bytes(frame))

    async def run(self) -> None:
        while self._running:
            for frame in await self.pf.receive(self.poll_ns):
                self._take(frame)
            await self._move_on()
            out, self.outbound = self.outbound, []
            for frame in out:
                await self.pf.send(frame)
            await self.pf.reap_tx()

    def _take(self, frame: bytes) -> None:
        if len(frame) >= 14 and frame[:6] == self.mac and \
                int.from_bytes(frame[12:14], "big") == FWD_ETHERTYPE:
            self.inbound.append(frame[14:])
        else:
            self.held.append(frame)

    async def _move_on(self) -> None:
        srv = self.server
        keep = []
        for frame in self.held:
            vm = self.vm_of.get(frame[:6])
            to = None
            if vm is not None:
                # the forwarding rule, or (once the rule is gone, for a frame that came late)
                # wherever the guest runs now
                to = srv.forward.get(vm.name) or (vm.host if vm.host is not srv else None)
            if to is not None and to.switch is not None:
                await self.pf.send(to.switch.mac + self.mac + FWD_ETHERTYPE.to_bytes(2, "big")
                                   + frame)
                srv.forwarded[vm.name] += 1
                self.forwarded.append(frame)
            elif vm is not None and vm.host is srv and srv.vf_running(vm.vf):
                await self.pf.send(frame)    # its VF runs again (a migration went back)
                self.delivered.append(frame)
            elif vm is not None and vm.host is srv:
                keep.append(frame)           # its guest is still here, or paused here
            else:
                self.dropped.append(frame)
        self.held = keep
        wait = []
        for frame in self.inbound:
            vm = self.vm_of.get(frame[:6])
            if vm is not None and vm.host is srv and srv.vf_running(vm.vf):
                await self.pf.send(frame)    # the card's switch takes it to the guest's VF
                self.delivered.append(frame)
            elif vm is not None and vm.host is not srv:
                self.held.append(frame)      # it moved on again (a rollback): forward it
            else:
                wait.append(frame)
        self.inbound = wait


class GuestVm(Vm):
    """A VM with a real guest: ``driver`` (its virtio-net driver, on its VF) and ``mem``.

    The guest's own loops (the bench's traffic) call :meth:`checkpoint` between operations:
    while the VM is paused they park there. :meth:`stop_and_copy` waits for every loop to
    park, copies the memory to the target host (charging ``copy_bytes_per_us``) and points the
    driver at the VF the VM's configuration names there (or back at its own VF)."""

    def __init__(self, name: str, load: float, clock: Clock, driver: VirtioNetDriver,
                 mem: GuestMemory, loops: int, copy_bytes_per_us: float = 3125.0) -> None:
        super().__init__(name, load, clock, memory_mb=max(1, mem.size >> 20))
        self.driver, self.mem, self.mac = driver, mem, driver.mac
        self.loops = loops
        self.parked = 0
        self.copy_bytes_per_us = copy_bytes_per_us
        self.copied: list[tuple[str, str, int]] = []
        self._origin: tuple[Server, int] | None = None

    async def checkpoint(self) -> None:
        if not self.paused:
            return
        self.parked += 1
        while self.paused:
            await self.mem.t.sleep_ns(200)
        self.parked -= 1

    async def stop_and_copy(self, source: Server, target: Server, clock: Clock,
                            us: float) -> None:
        while self.parked < self.loops:
            await clock.sleep_us(0.2)
        if self.config_vf is not None and self.config_vf[0] == target.name:
            self._origin = (source, self.vf)  # leaving its VF for the one its config names
            vf = self.config_vf[1]
        elif self._origin is not None and self._origin[0] is target:
            vf = self._origin[1]              # going back (a rollback)
        else:
            raise RuntimeError(f"{self.name}: no VF of {target.name} to run on")
        n = await self.mem.move_to(target.t)
        await clock.sleep_us(n / self.copy_bytes_per_us)
        self.copied.append((source.name, target.name, n))
        self.driver.rehome(target.vf(vf))


class AnnouncingNetwork(Network):
    """``announce(vm_name, server)`` runs whenever the orchestrator moves a VM's route."""

    def __init__(self, announce: Callable[[str, Server], None]) -> None:
        super().__init__()
        self.route = _Routes(announce)


class _Routes(dict):
    def __init__(self, announce):
        super().__init__()
        self._announce = announce

    def __setitem__(self, vm_name, server):
        super().__setitem__(vm_name, server)
        self._announce(vm_name, server)
