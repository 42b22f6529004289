"""Linux guests on the card (:class:`cosim.scenarios.guest_rig.CardRig`): round trips from a
back-end's trace, a transfer between two guests, ping's summary. (The card's switch counters:
:func:`cosim.scenarios.virtio.counters`.)"""

import time

from cosim.scenarios.guest_rig import vf_ip


def sim_rtts_us(trace):
    """Simulated round trips of a VF's pings, from its back-end's ``trace`` (while it pings a
    peer): from each transmit notification to the next receive interrupt (µs)."""
    out, t_kick = [], None
    for t, what, q in trace:
        if what == "kick" and q == 1:
            t_kick = t
        elif what == "irq" and q == 0 and t_kick is not None:
            out.append((t - t_kick) / 1000)
            t_kick = None
    return out


TRANSFER_KIB = 256


async def transfer(rig, src, dst, port=5000, kib=TRANSFER_KIB, timeout_s=600):
    """``kib`` KiB of random bytes from guest ``src`` to guest ``dst`` over TCP (busybox nc);
    returns (md5 in src, md5 in dst, bytes received, wall seconds, simulated cycles)."""
    # (the listener's stdin stays open: at its end busybox nc would close its sending half and
    # the sender, seeing that, would stop sending)
    rc, out = await rig.run(dst, f"rm -f /tmp/rx; (sleep 900 | nc -l -p {port} > /tmp/rx "
                                 f"2>/dev/null &) ; sleep 0.3; echo listening")
    assert rc == 0, out
    rc, out = await rig.run(src, f"dd if=/dev/urandom of=/tmp/tx bs=1024 count={kib} "
                                 f"2>/dev/null; md5sum /tmp/tx")
    assert rc == 0, out
    md5_src = out.split()[0]
    t0, c0 = time.monotonic(), rig.h.cycles()
    rc, out = await rig.run(src, f"nc {vf_ip(dst)} {port} < /tmp/tx", timeout_s=timeout_s)
    assert rc == 0, f"nc in the guest on VF{src}: {out}"
    rc, out = await rig.run(dst, "for i in $(seq 100); do pidof nc >/dev/null || break; "
                                 "sleep 0.2; done; md5sum /tmp/rx; wc -c < /tmp/rx",
                            timeout_s=60)
    assert rc == 0, out
    md5_dst, size = out.split()[0], int(out.split()[-1])
    return md5_src, md5_dst, size, time.monotonic() - t0, rig.h.cycles() - c0


def ping_start(dst, count, interval_s):
    """A guest command: ``count`` pings to ``dst`` every ``interval_s`` in the background, its
    output in /tmp/ping.log and its pid in /tmp/ping.pid (:func:`ping_wait` collects them)."""
    return (f"rm -f /tmp/ping.log /tmp/ping.pid; (ping -i {interval_s} -c {count} -W 2 {dst} "
            f"> /tmp/ping.log 2>&1 & echo $! > /tmp/ping.pid); sleep 0.5")


def ping_wait(limit_s):
    """A guest command: wait (at most ``limit_s``) until the ping of :func:`ping_start` has
    exited, then print its output; run it in whichever guest runs the pinging machine now."""
    tenths = int(limit_s * 10)
    return (f"p=$(cat /tmp/ping.pid); for i in $(seq {tenths}); do kill -0 $p 2>/dev/null || "
            f"break; sleep 0.1; done; cat /tmp/ping.log")


def ping_summary(out):
    """(transmitted, received, avg ms) from ping's last lines."""
    tx = rx = 0
    avg = None
    for line in out.splitlines():
        if "packets transmitted" in line:
            parts = line.split()
            tx, rx = int(parts[0]), int(parts[3])
        if "round-trip" in line:
            avg = float(line.split("=")[1].split("/")[1])
    return tx, rx, avg


class TrafficAcross:
    """A guest's pings to ``peer`` (``count``, every 100 ms) and ``TRANSFER_KIB`` KiB over TCP
    to a guest on ``dst_rig``'s VF ``dst``, started on ``src_rig``'s VF ``src`` and running
    across a migration; :meth:`finish` collects both from wherever the guest runs then."""

    def __init__(self, src_rig, src, dst_rig, dst, peer, count, port=5001):
        self.src_rig, self.src, self.dst_rig, self.dst = src_rig, src, dst_rig, dst
        self.peer, self.count, self.port = peer, count, port

    async def start(self):
        """The receiver listening, the file written, pings and the transfer under way."""
        rc, out = await self.dst_rig.run(self.dst, f"rm -f /tmp/rx; (sleep 900 | nc -l -p "
                                                   f"{self.port} > /tmp/rx 2>/dev/null &); "
                                                   f"sleep 0.3")
        assert rc == 0, out
        rc, out = await self.src_rig.run(self.src, f"dd if=/dev/urandom of=/tmp/tx bs=1024 "
                                                   f"count={TRANSFER_KIB} 2>/dev/null; "
                                                   f"md5sum /tmp/tx")
        assert rc == 0, out
        self.md5_sent = out.split()[0]
        from .guest_rig import vf_ip
        dst_ip = vf_ip(self.dst)
        rc, out = await self.src_rig.run(
            self.src, f"rm -f /tmp/tx.done; {ping_start(self.peer, self.count, 0.1)}; "
                      f"(nc {dst_ip} {self.port} < /tmp/tx; echo $? > /tmp/tx.done) & sleep 0.5")
        assert rc == 0, out
        rx = self.dst_rig.card.backends[self.dst]
        await self.dst_rig.pump.until(lambda: rx.calls[0] > 20, 120,
                                      f"the transfer to VF{self.dst} under way")
        return self

    async def finish(self, log, rig, n, what):
        """Pings and transfer collected in ``rig``'s VF ``n`` guest (where the migrated guest
        runs now): ``(sent, answered)``; asserts the transfer arrived byte-exact and that no
        more than 5 s of replies were lost (an outage, not a switch-over)."""
        rc, out = await rig.run(n, ping_wait(self.count * 0.1 + 30),
                                timeout_s=self.count * 0.1 + 90)
        sent, got, _ = ping_summary(out)
        log.info("pings across the migration %s: %d sent, %d answered, %d lost",
                 what, sent, got, sent - got)
        assert sent == self.count and got >= self.count - 50, out
        rc, out = await rig.run(n, "while [ ! -e /tmp/tx.done ]; do sleep 0.5; done; "
                                   "cat /tmp/tx.done", timeout_s=600)
        assert rc == 0 and out.strip() == "0", f"nc in the migrated guest: {out}"
        rc, out = await self.dst_rig.run(self.dst, "for i in $(seq 100); do pidof nc "
                                                   ">/dev/null || break; sleep 0.2; done; "
                                                   "md5sum /tmp/rx; wc -c < /tmp/rx",
                                         timeout_s=60)
        md5_got, size = out.split()[0], int(out.split()[-1])
        log.info("transfer across the migration %s: %d bytes, md5 %s sent, %s received",
                 what, size, self.md5_sent, md5_got)
        assert size == TRANSFER_KIB * 1024 and md5_got == self.md5_sent, out
        return sent, got
