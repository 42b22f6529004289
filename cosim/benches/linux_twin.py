"""A Linux guest migrated by QEMU from one server's card to another's (issue 19), on the
two-card top (``cosim.twin``): card A and card B, each on its own ``RootComplex`` and host
memory, serving VFs over vhost-user (:class:`cosim.scenarios.guest_rig.TwinRig`), their uplinks
joined by a learning switch with the peer outside both servers."""

import cocotb

from cosim.scenarios.dirty import WireWrites
from cosim.scenarios.guest_rig import TwinRig, PEER_IP, vf_ip, vf_mac
from cosim.scenarios.linux import ping_start, ping_summary, ping_wait, TRANSFER_KIB
from cosim.scenarios.qemu_migration import migrate, retire_source, retired, set_mac
from cosim.scenarios.virtio import counters
from cosim.vhost_card import ETH_RARP


def _mac(text):
    return bytes.fromhex(text.replace(":", ""))


def frames_from(fabric, mac, since_ns):
    """Ports of the fabric where frames from ``mac`` came in since ``since_ns``."""
    return [ingress for t, ingress, _, f in fabric.log if t >= since_ns and f[6:12] == mac]


@cocotb.test()
async def test_qemu_migration_between_cards(dut):
    """A guest on card A's VF1 pings the peer every 100 ms and sends 256 KiB over TCP to a
    guest on card B's VF2 while QEMU migrates it to a QEMU on card B's VF1 (reserved: its
    address retired in B's switch until the guest arrives). Card A logs the pages it writes into
    QEMU's dirty log (every page on A's wire while logged is marked); after the switch-over
    QEMU's announcement (``SEND_RARP``) makes card B broadcast a RARP from the guest's MAC, the
    network learns the guest's new port, the transfer arrives byte-exact and the guest's frames
    go through card B only (the fabric's ingress ports, both cards' counters); A's VF1 is free
    once the source QEMU quits. Then the guest goes back to card A the same way."""
    rig = await TwinRig(dut, [1], [1, 2]).start()
    a, b, fabric = rig.a, rig.b, rig.fabric
    guest_mac = _mac(vf_mac(1))
    try:
        # B's VF1 is the reserved replacement: no address in B's switch until the guest lands
        await set_mac(b.h, 1, retired(guest_mac))
        await a.boot(1, qmp=True)
        await b.boot(2)                                       # the transfer's receiver on B
        wire = WireWrites(a.h)
        rc, out = await a.run(1, f"ping -c 3 -W 5 {PEER_IP}", timeout_s=120)
        assert rc == 0 and " 0% packet loss" in out, out
        assert set(frames_from(fabric, guest_mac, 0)) == {"A"}
        rc, out = await a.run(1, f"ping -c 3 -W 5 {vf_ip(2)}", timeout_s=120)
        assert rc == 0 and " 0% packet loss" in out, f"A's guest to B's guest: {out}"
        rc, out = await b.run(2, "rm -f /tmp/rx; (sleep 900 | nc -l -p 5001 > /tmp/rx "
                                 "2>/dev/null &); sleep 0.3")
        assert rc == 0, out
        rc, out = await a.run(1, f"dd if=/dev/urandom of=/tmp/tx bs=1024 count={TRANSFER_KIB}"
                                 f" 2>/dev/null; md5sum /tmp/tx")
        md5_sent = out.split()[0]
        count = 200                                           # 20 s, one every 100 ms
        rc, out = await a.run(1, f"rm -f /tmp/tx.done; {ping_start(PEER_IP, count, 0.1)}; "
                                 f"(nc {vf_ip(2)} 5001 < /tmp/tx; echo $? > /tmp/tx.done) & "
                                 f"sleep 0.5")
        assert rc == 0, out
        rx2 = b.card.backends[2]
        await rig.pump.until(lambda: rx2.calls[0] > 20, 120, "the transfer to B's VF2 under way")
        st = await migrate(dut._log, a, 1, 1, wire, to=b)
        t_done = a.h.t.now_ns()
        await rig.pump.until(lambda: b.card.announcements, 60, "QEMU's announcement on B")
        rarps = [i for t, i, _, f in fabric.log if f[6:12] == guest_mac
                 and int.from_bytes(f[12:14], "big") == ETH_RARP]
        assert rarps and set(rarps) == {"B"}, rarps
        ctr_a, ctr_b = await counters(a.h), await counters(b.h)
        rc, out = await b.run(1, ping_wait(count * 0.1 + 30), timeout_s=count * 0.1 + 90)
        sent, got, _ = ping_summary(out)
        dut._log.info("pings across the migration A -> B: %d sent, %d answered, %d lost",
                      sent, got, sent - got)
        assert sent == count and got >= count - 50, out
        rc, out = await b.run(1, "while [ ! -e /tmp/tx.done ]; do sleep 0.5; done; "
                                 "cat /tmp/tx.done", timeout_s=600)
        assert rc == 0 and out.strip() == "0", f"nc in the migrated guest: {out}"
        rc, out = await b.run(2, "for i in $(seq 100); do pidof nc >/dev/null || break; "
                                 "sleep 0.2; done; md5sum /tmp/rx; wc -c < /tmp/rx", timeout_s=60)
        md5_got, size = out.split()[0], int(out.split()[-1])
        dut._log.info("transfer across the migration A -> B: %d bytes, md5 %s sent, %s "
                      "received", size, md5_sent, md5_got)
        assert size == TRANSFER_KIB * 1024 and md5_got == md5_sent, out
        # from now on the guest's frames go through card B only
        rc, out = await b.run(1, f"ping -c 5 -W 5 {PEER_IP}", timeout_s=120)
        assert rc == 0 and " 0% packet loss" in out, out
        after = frames_from(fabric, guest_mac, t_done)
        assert after and set(after) == {"B"}, after
        ctr_a2, ctr_b2 = await counters(a.h), await counters(b.h)
        assert ctr_a2["TX_FRAMES"] == ctr_a["TX_FRAMES"], (ctr_a, ctr_a2)
        assert ctr_b2["TX_FRAMES"] >= ctr_b["TX_FRAMES"] + 5, (ctr_b, ctr_b2)
        dut._log.info("QEMU migration A -> B: %s; RARPs from B: %d",
                      {k: st.get(k) for k in ("total-time", "downtime", "card_pause_us",
                                              "pages_written", "pages_logged")}, len(rarps))
        await retire_source(a, 1)                             # A's VF1 free
        # and back to card A
        wire_b = WireWrites(b.h)
        rc, out = await b.run(1, ping_start(PEER_IP, 80, 0.1))
        assert rc == 0, out
        t_back = b.h.t.now_ns()
        await migrate(dut._log, b, 1, 1, wire_b, to=a)
        rc, out = await a.run(1, ping_wait(8 + 30), timeout_s=8 + 90)
        sent, got, _ = ping_summary(out)
        dut._log.info("pings across the migration B -> A: %d sent, %d answered", sent, got)
        assert sent == 80 and got >= 60, f"pings across the migration back: {out}"
        rc, out = await a.run(1, f"ping -c 5 -W 5 {PEER_IP}", timeout_s=120)
        assert rc == 0 and " 0% packet loss" in out, f"the guest back on card A: {out}"
        t_end = a.h.t.now_ns()
        back = [i for t, i, _, f in fabric.log if t_back <= t <= t_end and f[6:12] == guest_mac]
        assert back[-1] == "A" and set(back) == {"A", "B"}, back
        await retire_source(b, 1)
    finally:
        rig.close()
