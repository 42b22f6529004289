"""QEMU's own live migration of a Linux guest between two VFs of the card (issue 19): the
destination QEMU started with ``-incoming`` on the other VF's socket, the migration driven over
QMP, the switch told where the guest's MAC lives now, and the card's dirty log checked against
the memory writes on the wire. Shared by the guest bench and ``make bench``."""

import socket
import time


from cosim.vhost_card import guest_window, log_window, LOG_WINDOW_SIZE
from .guest_rig import mac_bytes, retired, set_mac

__all__ = ["free_port", "retired", "set_mac", "start_destination", "query_migrate", "wait_migration",
           "migrate", "begin_migration", "finish_migration", "release_vf", "retire_source", "TwinQemuControl",
           "orchestrated_migration"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_destination(rig, dst, src, port, source=None):
    """A QEMU on VF ``dst``'s socket waiting for VF ``src``'s guest (of rig ``source``'s card,
    by default ``rig``'s) on ``port``; returns once its monitor answers (QEMU listens for the
    migration before its monitor runs)."""
    rig.start_incoming(dst, like=src, port=port, source=source)
    status = await rig.qmp(dst, "query-status")
    assert status["status"] == "inmigrate", status


async def query_migrate(rig, n):
    return await rig.qmp(n, "query-migrate")


async def wait_migration(rig, n, until=("completed", "failed", "cancelled"), timeout_s=600):
    """Poll VF ``n``'s QEMU (the source) every half second until the migration's status is one
    of ``until``; its ``query-migrate``."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = await query_migrate(rig, n)
        if status.get("status") in until:
            return status
        assert time.monotonic() < deadline, f"migration still {status.get('status')}: {status}"
        later = time.monotonic() + 0.5
        await rig.pump.until(lambda: time.monotonic() > later, 5, "half a second")


async def migrate(log, rig, src, dst, wire, *, to=None, **params):
    """Migrate the guest of VF ``src``'s QEMU to a new QEMU on VF ``dst``'s socket, of the same
    card or of rig ``to``'s card (another server): :func:`begin_migration` then
    :func:`finish_migration`, which returns QEMU's ``query-migrate`` result with the card's
    figures."""
    to = to or rig
    await begin_migration(rig, src, to, dst, wire, **params)
    status = await wait_migration(rig, src)
    assert status["status"] == "completed", status
    return await finish_migration(log, rig, src, to, dst, wire, status)


async def begin_migration(rig, src, to, dst, wire, then_bandwidth=0, **params):
    """Start a QEMU on rig ``to``'s VF ``dst`` waiting for the guest of rig ``rig``'s VF
    ``src`` and start QEMU's migration to it; returns once the source VF has written a few
    pages into the guest while the card logged them (the migration runs slowly, 200 kB/s,
    until then, so that the dirty-log check is never vacuous) and QEMU goes on at
    ``then_bandwidth`` bytes/s (0: full speed)."""
    be_src = rig.card.backends[src]
    port = free_port()
    await start_destination(to, dst, src, port, source=rig)
    await rig.qmp(src, "migrate-set-parameters", **{"downtime-limit": 2000,
                                                    "max-bandwidth": 200_000, **params})
    await rig.qmp(src, "migrate", uri=f"tcp:127.0.0.1:{port}")
    await rig.pump.until(lambda: src in rig.card.dirty.logs and be_src.log_on_ns is not None
                         and len(wire.written(src, since_ns=be_src.log_on_ns)) >= 3, 120,
                         f"VF{src} writing guest pages while the card logs them")
    await rig.qmp(src, "migrate-set-parameters", **{"max-bandwidth": then_bandwidth})


async def finish_migration(log, rig, src, to, dst, wire, status):
    """After QEMU said completed: the source VF stopped, the destination VF runs the rings,
    the switches give ``dst`` the guest's MAC (``src``'s entry retired), the console moves to
    the new QEMU, and the dirty log is checked against the wire (``wire`` records the source
    card): every page ``src`` wrote while the card logged it was marked. ``status`` gains
    ``pages_written`` / ``pages_logged`` (the source VF's, while logged) and ``card_pause_us``
    (simulated time from the source VF's stop to the destination VF's rings up)."""
    be_src, be_dst = rig.card.backends[src], to.card.backends[dst]
    where = f"{rig.name}'s VF{src} -> {to.name}'s VF{dst}" if to is not rig else \
        f"VF{src} -> VF{dst}"
    log.info("QEMU migration %s: %s", where,
             {k: status.get(k) for k in ("total-time", "downtime", "setup-time")})
    assert not be_src.live and be_src.stopped, f"VF{src} still runs the guest's rings"
    await rig.pump.until(lambda: be_dst.live, 120, f"VF{dst} runs the migrated guest's rings")
    mac = mac_bytes(rig.guests[src].ready.mac)
    await set_mac(rig.h, src, retired(mac))                 # the source's entry retired
    await set_mac(to.h, dst, mac)                           # the guest's address on dst
    to.adopt(dst, like=src, source=rig)
    # the dirty log against the wire: every page the source VF wrote while the card logged it
    assert be_src.log_on_ns is not None, f"the card's logger never went on for VF{src}"
    written = wire.written(src, since_ns=be_src.log_on_ns)
    marked = {m for m, v in wire.marks}
    base, first = log_window(src), guest_window(src)
    missed = [p for p in written if base + (p - first) // 4096 // 8 not in marked]
    assert written and not missed, (f"VF{src} wrote {len(written)} pages while logged, "
                                    f"{len(missed)} not marked: {sorted(map(hex, missed))[:8]}")
    logged = {first + (8 * (a - base) + b) * 4096 for a in marked
              if base <= a < base + LOG_WINDOW_SIZE for b in range(8)}
    log.info("dirty log: VF%d wrote %d pages while logged, marked in %d pages (%d extra)",
             src, len(written), len(logged), len(logged - written))
    status.update(pages_written=len(written), pages_logged=len(logged),
                  card_pause_us=round((be_dst.live_ns - be_src.stop_ns) / 1000, 1))
    return status


async def release_vf(rig, n, what="its QEMU quit"):
    """VF ``n``'s QEMU (if still there) killed; returns once its back-end has reset the VF
    and dropped the guest's memory."""
    be = rig.card.backends[n]
    if n in rig.guests:
        rig.kill(n)
    await rig.pump.until(lambda: be.memory is None and rig.card.idle, 60,
                         f"{rig.name or 'the card'}'s VF{n} released after {what}")
    return be


async def retire_source(rig, n):
    """The source QEMU (paused after the migration) quits; its VF is reset and free."""
    be = await release_vf(rig, n)
    assert await be.drv.read_status() == 0


class TwinQemuControl:
    """:class:`host_driver.system.qemu.QemuControl` on a :class:`cosim.scenarios.guest_rig.TwinRig`:
    the servers are named like its rigs ("A", "B"), a VM's QEMU is the one on its server's VF,
    and ``wires`` (a :class:`cosim.scenarios.dirty.WireWrites` per server) check each source
    card's dirty log. ``then_bandwidth`` slows QEMU after its first phase (a bench that kills
    the destination in mid-migration needs it still running); :attr:`finished` keeps every
    completed migration's figures."""

    def __init__(self, log, twin, wires, then_bandwidth=0):
        self.log, self.rigs, self.wires = log, twin.rigs, wires
        self.then_bandwidth = then_bandwidth
        self.finished = []

    async def start_incoming(self, vm, target, vf):
        # the host learns the moment QEMU stops its VF (GET_VRING_BASE at switch-over): from
        # then on its switch holds the guest's frames instead of handing them to that VF
        source, svf = vm.host, vm.vf
        be = self.rigs[source.name].card.backends[svf]
        be.on_stopped = lambda: source.running.discard(svf)
        await begin_migration(self.rigs[vm.host.name], vm.vf, self.rigs[target.name], vf,
                              self.wires[vm.host.name], then_bandwidth=self.then_bandwidth)

    async def wait(self, vm):
        return await wait_migration(self.rigs[vm.host.name], vm.vf)

    async def switch_over(self, vm, source, svf, target, tvf):
        rig = self.rigs[source.name]
        vm.status = await finish_migration(self.log, rig, svf, self.rigs[target.name], tvf,
                                           self.wires[source.name], vm.status)
        self.finished.append(dict(vm.status))

    async def cancel(self, vm, target, vf):
        rig = self.rigs[vm.host.name]
        status = await query_migrate(rig, vm.vf)
        if status.get("status") not in ("completed", "failed", "cancelled", None):
            await rig.qmp(vm.vf, "migrate_cancel")
        status = await wait_migration(rig, vm.vf)
        await release_vf(self.rigs[target.name], vf, "the abort")
        be = rig.card.backends[vm.vf]
        await rig.pump.until(lambda: be.live and vm.vf not in rig.card.dirty.logs
                             and rig.card.idle, 60,
                             f"{vm.host.name}'s VF{vm.vf} running the guest again, unlogged")
        be.on_stopped = None
        vm.host.running.add(vm.vf)

    async def revert(self, vm, source, svf, target, tvf):
        await release_vf(self.rigs[target.name], tvf, "the revert")
        rig = self.rigs[source.name]
        await set_mac(self.rigs[target.name].h, tvf, retired(vm.mac))
        await set_mac(rig.h, svf, vm.mac)
        await rig.qmp(svf, "cont")
        be = rig.card.backends[svf]
        be.on_stopped = None
        await rig.pump.until(lambda: be.live, 60, f"{source.name}'s VF{svf} running the "
                                                  f"guest again")

    async def retire_source(self, vm, source, svf):
        self.rigs[source.name].card.backends[svf].on_stopped = None
        await retire_source(self.rigs[source.name], svf)


async def orchestrated_migration(log, twin, pings, *, load_a=0.8, load_b=0.1):
    """On a :class:`cosim.scenarios.guest_rig.TwinRig` whose card A runs a guest on VF1 (booted
    with ``qmp=True``) and whose card B serves VF1: the hosts' switches up, and the seed-004
    orchestrator (:class:`host_driver.system.qemu.QemuMigrationOrchestrator`) moving the guest
    to B's VF1 while it pings the peer ``pings`` times, every 100 ms. Returns the orchestrator's
    result and a row of figures (QEMU's total and down time, the card's pause, the pages the
    source card wrote while logged and those its marks cover, pings sent and lost, frames
    forwarded by A's switch, RARPs from B); the switches stay up (``twin.switches``)."""
    from host_driver.system.live import CardServer, TransportClock
    from host_driver.system.migration import MigrationCosts, Network
    from host_driver.system.qemu import QemuMigrationOrchestrator, QemuVm
    from .dirty import WireWrites
    from .guest_rig import PEER_IP
    from .linux import ping_start, ping_summary, ping_wait
    a, b = twin.a, twin.b
    mac = mac_bytes(a.guests[1].ready.mac)
    clock = TransportClock(a.h.t)
    srv_a = CardServer("A", a.h.drv, [a.vfs[0]], load=load_a)
    srv_b = CardServer("B", b.h.drv, [b.vfs[0]], load=load_b)
    network = Network()
    vm = QemuVm("guest", 0.1, clock, mac)
    srv_a.place(vm, network)
    switches = await twin.start_host_switches({"A": srv_a, "B": srv_b}, {mac: vm})
    control = TwinQemuControl(log, twin, {"A": WireWrites(a.h), "B": WireWrites(b.h)})
    rc, out = await a.run(1, ping_start(PEER_IP, pings, 0.1))
    assert rc == 0, out
    res = await QemuMigrationOrchestrator(
        [srv_a, srv_b], network, t1=load_a + 0.05, t2=0.5, clock=clock,
        control=control, costs=MigrationCosts(step_us=1)).migrate()
    assert res.outcome.value == "done", res
    rc, out = await b.run(1, ping_wait(pings * 0.1 + 30), timeout_s=pings * 0.1 + 90)
    sent, got, _ = ping_summary(out)
    assert sent == pings, out
    st = control.finished[-1]
    return res, {"route": "A VF1 -> B VF1", "qemu_total_ms": st.get("total-time"),
                 "qemu_downtime_ms": st.get("downtime"), "card_pause_us": st["card_pause_us"],
                 "pages_written": st["pages_written"], "pages_logged": st["pages_logged"],
                 "pings_sent": sent, "pings_lost": sent - got,
                 "forwarded_by_a": len(switches["A"].forwarded),
                 "rarps_from_b": len(b.card.announcements)}
