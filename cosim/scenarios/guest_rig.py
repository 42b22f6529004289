"""A simulated card serving Linux guests: the set-up that the guest benches, ``make demo`` and
``python -m cosim.vhost_serve`` share.

:class:`CardRig` brings the card up through the ``RootComplex`` (enumeration, SR-IOV), puts a
network peer (:class:`cosim.netpeer.NetPeer`: ARP and ICMP echo) on the card's uplink port,
and serves chosen VFs over vhost-user (:class:`cosim.vhost_card.VhostCard`), all file
descriptors in one :class:`cosim.vhost_user.Reactor` run by a :class:`cosim.vhost_card.FdPump`.
:meth:`CardRig.boot` starts a QEMU guest on a VF's socket and registers its console there too;
:meth:`CardRig.run` runs a command in a guest while the simulation goes on.

:class:`TwinRig` is the same for two servers on the two-card top: a :class:`CardRig` per card,
one reactor, the uplinks on a learning switch (:class:`cosim.fabric.Fabric`) with the peer
outside, and (:meth:`TwinRig.start_host_switches`) each host's software switch on its PF.
"""

import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cocotb

from regmap import MigRegs as MG, NetRegs, VirtioRegs as V
from host_driver.virtio import DirectAccess, HostMemory, VirtioNetDriver
from ..fabric import Fabric
from ..harness import CardHarness, start_twin
from ..uplink import Uplink
from ..netpeer import NetPeer
from ..vhost_user import Reactor
from ..vhost_card import VhostCard, FdPump

__all__ = ["CardRig", "TwinRig", "PEER_IP", "PEER_MAC", "vf_mac", "vf_ip", "mac_bytes",
           "retired", "set_mac"]

log = logging.getLogger(__name__)

PEER_IP = "10.0.0.254"
PEER_MAC = bytes.fromhex("020000fe00fe")
NET = "10.0.0"


def vf_mac(n: int) -> str:
    """The MAC address VF ``n`` has in the card's switch (and its guest is given)."""
    return ":".join(f"{b:02x}" for b in V.MAC_PREFIX + bytes([n]))


def mac_bytes(text: str) -> bytes:
    """``"02:0f:fc:00:00:01"`` as its 6 bytes."""
    return bytes.fromhex(text.replace(":", ""))


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


def vf_ip(n: int) -> str:
    return f"{NET}.{n}"


class CardRig:
    def __init__(self, dut, vfs, *, num_vfs=None, sock_dir=None, on_event=None, harness=None,
                 reactor=None, name=""):
        self.dut = dut
        self.name = name                      # "A" / "B" on the two-card top ("" alone)
        self.vf_numbers = list(vfs)
        self.num_vfs = num_vfs or max(self.vf_numbers)
        self.h = harness or CardHarness(dut)
        self.reactor = reactor or Reactor()
        self.claim_on_boot = False            # (TwinRig: entries retired until a guest boots)
        self.sock_dir = Path(sock_dir or tempfile.mkdtemp(prefix="offcard_vhost_"))
        self.events = []
        self._on_event = on_event
        self.guests = {}
        self.peer = NetPeer(PEER_MAC, PEER_IP)
        self._last = None
        self._boot_kw = {}
        self._qmp_pool = None

    def event(self, text):
        if self.name:
            text = f"{self.name}: {text}"
        self.events.append((time.monotonic(), text))
        if self._on_event:
            self._on_event(text)
        else:
            log.info("%s", text)

    def socket_path(self, n):
        return self.sock_dir / f"vf{n}.sock"

    async def start(self, *, reset=True, peer=True, pump=True):
        """Card up (unless ``harness`` came started: ``reset=False``), VFs enabled, the peer on
        the uplink (unless ``peer=False``: the uplink joins a :class:`cosim.fabric.Fabric`),
        sockets open, the file descriptors pumped (unless ``pump=False``: a rig of two cards
        pumps their shared reactor once, :class:`TwinRig`)."""
        h = self.h
        if reset:
            await h.start()
        if not h.drv.pf:
            await h.drv.probe()
        self.vfs = await h.drv.enable_sriov(self.num_vfs)
        self.uplink = Uplink(self.dut, h.data_width, prefix=h.prefix)
        if peer:
            cocotb.start_soon(self._peer())
        chosen = [self.vfs[n - 1] for n in self.vf_numbers]
        self.card = await VhostCard(h, chosen, [str(self.socket_path(n))
                                                for n in self.vf_numbers],
                                    self.reactor, self.event).start()
        if pump:
            self.pump = FdPump(self.reactor, self._idle).start()
        return self

    async def _peer(self):
        while True:
            frame = await self.uplink.arrived.get()
            for reply in self.peer.handle(frame):
                self.uplink.send(reply)

    def _idle(self):
        """Nothing moved on the link or the uplink since the last look, and no card job is
        queued: the simulation can wait for the outside world."""
        b, u = self.h.bridge, self.uplink
        now = (b.tlps_in, b.tlps_out, len(u.received), u._to_card.qsize())
        quiet = now == self._last and b.idle.is_set() and self.card.idle and now[3] == 0
        self._last = now
        return quiet

    # ---- guests -----------------------------------------------------------------------------
    def qemu_options(self, n):
        """The QEMU options that attach a guest to VF ``n``'s socket."""
        from ..guest.qemu import vhost_user_net
        return [*vhost_user_net(self.socket_path(n)), "-device",
                f"virtio-net-pci,netdev=net0,disable-legacy=on,vectors=0,mac={vf_mac(n)}"]

    async def boot(self, n, *, timeout_s=120, **kw):
        """Start a guest on VF ``n`` (IP 10.0.0.<n>/24) and wait until its eth0 is up."""
        from ..guest.image import ensure_image
        from ..guest.qemu import Guest, vhost_user_net
        image = ensure_image()
        if self.claim_on_boot:                 # the VF takes the guest's address now
            await set_mac(self.h, n, mac_bytes(vf_mac(n)))
        self._boot_kw[n] = dict(mac=vf_mac(n), ip=f"{vf_ip(n)}/24", peer=PEER_IP, **kw)
        g = Guest.start(image, netdev_args=vhost_user_net(self.socket_path(n)),
                        boot_timeout=timeout_s, **self._boot_kw[n])
        self.guests[n] = g
        self.reactor.register(g.fileno(), g.on_readable)
        t0 = time.monotonic()

        def up():
            if g.errors or not g.alive:
                raise g.error(f"guest on VF{n} failed to come up")
            return g.ready is not None
        await self.pump.until(up, timeout_s, f"guest on VF{n}: eth0 up")
        g.boot_s = time.monotonic() - t0
        self.event(f"VF{n}: guest up, eth0 {g.ready.mac} {g.ready.ip} after {g.boot_s:.1f} s")
        return g

    def start_incoming(self, n, like, port, source=None):
        """Start a QEMU on VF ``n``'s socket that waits for the guest of VF ``like`` (of rig
        ``source``'s card, by default this one's) to be migrated in (``-incoming`` on loopback
        ``port``): the same machine and NIC (its MAC too), with a QMP socket. Its console is
        registered; :meth:`adopt` once it runs."""
        from ..guest.image import ensure_image
        from ..guest.qemu import Guest, vhost_user_net
        kw = dict((source or self)._boot_kw[like])
        kw["qmp"] = True
        extra = list(kw.get("extra_args", ()))
        while "-incoming" in extra:                   # (the source came in that way itself)
            i = extra.index("-incoming")
            del extra[i:i + 2]
        kw["extra_args"] = [*extra, "-incoming", f"tcp:127.0.0.1:{port}"]
        g = Guest.start(ensure_image(), netdev_args=vhost_user_net(self.socket_path(n)), **kw)
        self._boot_kw[n] = kw
        self.guests[n] = g
        self.reactor.register(g.fileno(), g.on_readable)
        self.event(f"VF{n}: QEMU waiting for VF{like}'s guest on tcp:127.0.0.1:{port}")
        return g

    def adopt(self, n, like, source=None):
        """VF ``n``'s QEMU now runs the guest migrated from VF ``like``'s (of rig ``source``'s
        card, by default this one's): commands go there."""
        self.guests[n].adopt((source or self).guests[like].ready)

    async def qmp(self, n, command, timeout_s=30, **arguments):
        """A QMP command to VF ``n``'s QEMU (started with ``qmp=True``), waited for while the
        simulation goes on (QEMU may wait for the back-end meanwhile)."""
        if self._qmp_pool is None:
            self._qmp_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="qmp")
        future = self._qmp_pool.submit(self.guests[n].qmp, command, timeout_s, **arguments)
        await self.pump.until(future.done, timeout_s + 5, f"QMP {command} on VF{n}'s QEMU")
        return future.result()

    async def run(self, n, cmd, timeout_s=60):
        """Run ``cmd`` in VF ``n``'s guest; ``(rc, output)``."""
        g = self.guests[n]
        token = g.send(cmd, timeout_s)

        def done():
            if not g.alive:
                raise g.error(f"guest on VF{n} died while running {cmd!r}")
            return g.poll(token) is not None
        await self.pump.until(done, timeout_s + 15, f"guest on VF{n}: {cmd!r}")
        return g.poll(token)

    def kill(self, n):
        g = self.guests.pop(n)
        self.reactor.unregister(g.fileno())
        g.kill()

    def close(self):
        for n in list(self.guests):
            self.kill(n)
        self.card.close()
        if self._qmp_pool is not None:
            self._qmp_pool.shutdown(wait=False, cancel_futures=True)


class TwinRig:
    """Two servers, each with its card serving Linux guests (the two-card top,
    :mod:`cosim.twin`): :attr:`a` and :attr:`b` are :class:`CardRig` s on ports ``a_`` / ``b_``,
    each with its own ``RootComplex`` and host memory, their sockets in folders of their own,
    their file descriptors in one reactor pumped once. The cards' uplinks are joined by a
    learning switch (:class:`cosim.fabric.Fabric`) with the peer outside both servers (ARP and
    ICMP echo at ``PEER_IP``)."""

    def __init__(self, dut, vfs_a, vfs_b, *, num_vfs=None, on_event=None):
        self.dut = dut
        self.reactor = Reactor()
        base = Path(tempfile.mkdtemp(prefix="offcard_twin_"))
        self.rigs = {}
        for name, prefix, vfs in (("A", "a_", vfs_a), ("B", "b_", vfs_b)):
            (base / name).mkdir()
            self.rigs[name] = CardRig(dut, vfs, num_vfs=num_vfs or max([*vfs_a, *vfs_b]),
                                      sock_dir=base / name, on_event=on_event,
                                      harness=CardHarness(dut, prefix=prefix),
                                      reactor=self.reactor, name=name)
        self.a, self.b = self.rigs["A"], self.rigs["B"]
        self.peer = NetPeer(PEER_MAC, PEER_IP)
        self.switches = {}                    # the hosts' switches, if started

    async def start(self):
        await start_twin(self.a.h, self.b.h)
        for rig in self.rigs.values():
            await rig.start(reset=False, peer=False, pump=False)
            # every card gives VF n the same address (vf_mac(n)): a VF that runs no guest
            # here must not claim the address of a guest on the other server. Each entry is
            # retired until a guest boots on the VF or migrates onto it
            for n in range(1, rig.num_vfs + 1):
                await set_mac(rig.h, n, retired(mac_bytes(vf_mac(n))))
            rig.claim_on_boot = True
        self.pump = FdPump(self.reactor, self._idle).start()
        self.fabric = Fabric(now_ns=self.a.h.t.now_ns)
        self.fabric.serve_peer(self.peer.handle)
        for name, rig in self.rigs.items():
            rig.pump = self.pump
            self.fabric.attach(name, rig.uplink)
        return self

    async def start_host_switches(self, servers, vm_of, poll_ns=100_000):
        """Each server's software switch on its PF (:class:`host_driver.system.live.HostSwitch`,
        ``servers``: a :class:`host_driver.system.live.CardServer` per rig name, ``vm_of``: the
        guests by MAC): the PF gets its own address and receive buffers, the card gives it every
        frame for no function and for a stopped one (``NetRegs.CTRL`` DEFAULT_PF), and frames
        that reach a server its guest has left are forwarded to the guest's new server; the
        card's announcements go out through the same queues. ``poll_ns``: how long the switch
        waits for an interrupt before looking at the device (its only MMIO while idle)."""
        from host_driver.system.live import HostSwitch
        self.switches = {}
        for site, (name, rig) in enumerate(self.rigs.items(), 0xA):
            h = rig.h
            pf = h.drv.pf
            await set_mac(h, 0, bytes([0x02, site, 0, 0, 0, 0]))
            d = VirtioNetDriver(DirectAccess(pf), pf, HostMemory(h.t), queue_size=64)
            await d.probe()
            await d.bring_up()
            await d.post_rx(48)
            await h.drv.mgmt_write(NetRegs.CTRL, NetRegs.CTRL_DEFAULT_PF)
            sw = self.switches[name] = HostSwitch(servers[name], d, vm_of, poll_ns=poll_ns)
            rig.card.host_switch = sw
            self.fabric.announce(d.mac, name)
            cocotb.start_soon(sw.run())
        return self.switches

    def _idle(self):
        return all([rig._idle() for rig in self.rigs.values()])     # (each one looks)

    def close(self):
        for sw in self.switches.values():
            sw.stop()
        for rig in self.rigs.values():
            rig.close()
