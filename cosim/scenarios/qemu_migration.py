"""QEMU's own live migration of a Linux guest between two VFs of the card (issue 19): the
destination QEMU started with ``-incoming`` on the other VF's socket, the migration driven over
QMP, the switch told where the guest's MAC lives now, and the card's dirty log checked against
the memory writes on the wire. Shared by the guest bench and ``make bench``."""

import socket
import time


from regmap import MigRegs as MG
from cosim.vhost_card import guest_window, log_window, LOG_WINDOW_SIZE

__all__ = ["free_port", "retired", "set_mac", "start_destination", "query_migrate", "wait_migration",
           "migrate", "retire_source"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def retired(mac):
    """``mac`` with the multicast bit set: as a function's address in the card's switch it
    retires the entry (no frame is addressed to a multicast source address's station)."""
    return bytes([mac[0] | 1]) + bytes(mac[1:])


async def set_mac(h, fidx, mac):
    """Function ``fidx``'s address in the card's switch (a :func:`retired` one retires the
    entry)."""
    await h.drv.mgmt_write(MG.SEL, fidx)
    await h.drv.mgmt_write(MG.MAC_LO, int.from_bytes(mac[:4], "little"))
    await h.drv.mgmt_write(MG.MAC_HI, int.from_bytes(mac[4:6], "little"))


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
    card or of rig ``to``'s card (another server); when QEMU says completed, the switches give
    ``dst`` the guest's MAC (``src``'s entry retired), the console moves to the new QEMU, and
    the dirty log is checked against the wire (``wire`` records the source card): every page
    ``src`` wrote while the card logged it was marked. The ``query-migrate`` result, with
    ``pages_written`` / ``pages_logged`` (the source VF's, while logged) and ``card_pause_us``
    (simulated time from the source VF's stop to the destination VF's rings up)."""
    to = to or rig
    be_src, be_dst = rig.card.backends[src], to.card.backends[dst]
    port = free_port()
    await start_destination(to, dst, src, port, source=rig)
    # slow at first (200 kB/s), so that the guest's traffic goes on while the card logs it,
    # then at full speed once the source VF has written a few pages into the guest
    await rig.qmp(src, "migrate-set-parameters", **{"downtime-limit": 2000,
                                                    "max-bandwidth": 200_000, **params})
    await rig.qmp(src, "migrate", uri=f"tcp:127.0.0.1:{port}")
    await rig.pump.until(lambda: src in rig.card.dirty.logs and be_src.log_on_ns is not None
                         and len(wire.written(src, since_ns=be_src.log_on_ns)) >= 3, 120,
                         f"VF{src} writing guest pages while the card logs them")
    await rig.qmp(src, "migrate-set-parameters", **{"max-bandwidth": 0})
    status = await wait_migration(rig, src)
    assert status["status"] == "completed", status
    where = f"{rig.name}'s VF{src} -> {to.name}'s VF{dst}" if to is not rig else \
        f"VF{src} -> VF{dst}"
    log.info("QEMU migration %s: %s", where,
             {k: status.get(k) for k in ("total-time", "downtime", "setup-time")})
    assert not be_src.live and be_src.stopped, f"VF{src} still runs the guest's rings"
    await rig.pump.until(lambda: be_dst.live, 120, f"VF{dst} runs the migrated guest's rings")
    mac = bytes.fromhex(rig.guests[src].ready.mac.replace(":", ""))
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


async def retire_source(rig, n):
    """The source QEMU (paused after the migration) quits; its VF is reset and free."""
    be = rig.card.backends[n]
    rig.kill(n)
    await rig.pump.until(lambda: be.memory is None and rig.card.idle, 60,
                         f"VF{n} released after its QEMU quit")
    assert await be.drv.read_status() == 0
