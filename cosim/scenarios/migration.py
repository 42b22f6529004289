"""Two servers with a guest on server A's card and its traffic with a peer outside, both
ways, without pause: the rig of the live-migration bench and of ``make demo``, on the
two-card top (``cosim.twin``). :class:`Rig` builds it; :meth:`Rig.orchestrator` makes the
migration orchestrator that moves the guest to server B's card."""

import cocotb

from regmap import NetRegs
from host_driver.system.live import (AnnouncingNetwork, CardServer, GuestMemory, GuestVm,
                                     HostSwitch, TransportClock)
from host_driver.system.migration import MigrationCosts, MigrationOrchestrator
from host_driver.vf_state import CardVfState
from host_driver.virtio import DirectAccess, VirtioNetDriver
from cosim.fabric import Fabric, PEER
from cosim.harness import CardHarness, start_twin
from cosim.uplink import Uplink
from cosim.scenarios.virtio import net

PEER_MAC = bytes([0x02, 0xEE, 0x00, 0x00, 0x00, 0x01])
GUEST_MEM = 512 << 10
GUEST_QUEUE = 16               # entries per virtqueue: 16 frame buffers each way
ETH_TEST = b"\x88\xb5"
TO_PEER, TO_GUEST = 1, 2       # the flow byte


def guest_mac(n):
    return bytes([0x52, 0x54, 0x00, 0x12, 0x34, 0x50 + n])


def site_mac(site, fidx):
    return bytes([0x02, site, 0x00, 0x00, 0x00, fidx])


def numbered(dst, src, seq, flow):
    """60..187 bytes; the flow byte and the sequence number follow the header."""
    return dst + src + ETH_TEST + bytes([flow]) + seq.to_bytes(4, "little") + bytes(41 + seq % 128)


def seq_of(frame):
    return int.from_bytes(frame[15:19], "little")


class Rig:
    """Two servers, the network, ``guests`` guests on A (guest *n* on A's VF *n*) and their
    traffic with the peer, both ways."""

    async def build(self, dut, guests=1):
        self.dut = dut
        ha, hb = CardHarness(dut, prefix="a_"), CardHarness(dut, prefix="b_")
        await start_twin(ha, hb)
        # the guests' memory: the same bus address on both hosts (module docstring of
        # host_driver.system.live), taken before anything else allocates
        bases = [ha.t.alloc_host_mem(GUEST_MEM) for _ in range(guests)]
        assert [hb.t.alloc_host_mem(GUEST_MEM) for _ in range(guests)] == bases, \
            "guest memory at different addresses on the two hosts"
        self.fabric = Fabric(now_ns=ha.t.now_ns)
        self.servers, self.switches = {}, {}
        self.vm_of = {}
        for name, h, site, load in (("A", ha, 0xAA, 0.9), ("B", hb, 0xBB, 0.2)):
            pf = await h.drv.probe()
            vfs = await h.drv.enable_sriov(2)
            st = CardVfState(h.drv)
            for fn in (pf, *vfs):
                await st.set_mac(fn, site_mac(site, fn.index))
            await h.drv.mgmt_write(NetRegs.CTRL, NetRegs.CTRL_DEFAULT_PF)
            self.fabric.attach(name, Uplink(dut, h.data_width, prefix=h.prefix))
            srv = self.servers[name] = CardServer(name, h.drv, vfs, load=load)
            pfd = await net(h, pf)
            await pfd.post_rx(48)
            self.switches[name] = HostSwitch(srv, pfd, self.vm_of)
            self.fabric.announce(pfd.mac, name)
        self.fabric.announce(PEER_MAC, PEER)
        self.h = {"A": ha, "B": hb}
        self.clock = TransportClock(ha.t)
        self.network = AnnouncingNetwork(
            lambda vm_name, srv: self.fabric.announce(self.vms[vm_name].mac, srv.name))
        self.vms = {}
        a = self.servers["A"]
        for n, base in enumerate(bases, 1):
            mac = guest_mac(n)
            await a.state.set_mac(a.vf(n), mac)
            mem = GuestMemory(ha.t, base, GUEST_MEM)
            d = VirtioNetDriver(DirectAccess(a.vf(n)), a.vf(n), mem, queue_size=GUEST_QUEUE)
            await d.probe()
            await d.bring_up()
            await d.post_rx(GUEST_QUEUE)
            assert d.mac == mac, d.mac
            vm = GuestVm(f"guest{n}", 0.1, self.clock, d, mem, loops=2)
            self.vms[vm.name] = self.vm_of[mac] = vm
            a.place(vm, self.network)              # the first free VF: guest n gets VF n
            assert vm.vf == n, (vm.name, vm.vf)
        self.vm = self.vms["guest1"]
        for sw in self.switches.values():
            cocotb.start_soon(sw.run())
        self.running = True                   # the guests and the peer send
        self.done = False                     # everyone stops looking
        self.tasks = [cocotb.start_soon(self._peer_tx()), cocotb.start_soon(self._peer_rx())]
        for vm in self.vms.values():
            self.tasks += [cocotb.start_soon(self._guest_tx(vm)),
                           cocotb.start_soon(self._guest_rx(vm))]
        return self

    # ---- the traffic ----
    async def _guest_tx(self, vm, every_ns=4000):
        seq = 0
        while self.running:
            await vm.checkpoint()
            await vm.driver.reap_tx()
            if vm.driver.tx.num_free < 2:
                # a full queue (its VF stopped for a while): wait where a pause can park the
                # guest, never inside the driver
                await self.clock.sleep_us(1)
                continue
            vm.tx.send(seq)
            await vm.driver.send(numbered(PEER_MAC, vm.mac, seq, TO_PEER))
            seq += 1
            await self.clock.sleep_us(every_ns / 1000)

    async def _guest_rx(self, vm):
        fwd = {name: sw.forwarded for name, sw in self.switches.items()}
        while not self.done:
            await vm.checkpoint()
            for f in await vm.driver.receive(2000):
                assert f[:6] == vm.mac and f[14] == TO_GUEST, f[:16].hex()
                hops = tuple(f"fwd@{n}" for n, lst in fwd.items() if f in lst)
                vm.rx.deliver(seq_of(f), hops + (f"vf@{vm.host.name}",))

    async def _peer_tx(self, every_ns=3000):
        seq = 0
        while self.running:
            for vm in self.vms.values():
                vm.rx.send(seq)
                self.fabric.from_peer(numbered(vm.mac, PEER_MAC, seq, TO_GUEST))
            seq += 1
            await self.clock.sleep_us(every_ns / 1000)

    async def _peer_rx(self):
        seen = 0
        while not self.done:
            for _, ingress, f in self.fabric.peer_rx[seen:]:
                vm = self.vm_of.get(f[6:12])
                if f[:6] == PEER_MAC and f[12:14] == ETH_TEST and f[14] == TO_PEER and vm:
                    vm.tx.deliver(seq_of(f), (f"vf@{ingress}",))
            seen = len(self.fabric.peer_rx)
            await self.clock.sleep_us(1)

    def lost_or_duplicated(self):
        return {vm.name: (vm.rx.lost, vm.tx.lost, vm.rx.duplicated, vm.tx.duplicated)
                for vm in self.vms.values()
                if vm.rx.lost or vm.tx.lost or vm.rx.duplicated or vm.tx.duplicated}

    def orchestrator(self, t1=0.8, t2=0.5, injector=None):
        return MigrationOrchestrator(
            self.servers.values(), self.network, t1=t1, t2=t2, clock=self.clock,
            failure_injector=injector,
            costs=MigrationCosts(step_us=1, precopy_us_per_mb=20, state_transfer_us=2,
                                 stop_copy_us=0))

    async def stop(self, drain_us=400):
        """Stop sending; wait until every frame sent has arrived (at most ``drain_us``)."""
        self.running = False
        t0 = self.clock.now_us()
        while any(vm.rx.lost or vm.tx.lost for vm in self.vms.values()) \
                and self.clock.now_us() - t0 < drain_us:
            await self.clock.sleep_us(2)
        self.done = True
        for t in self.tasks:
            await t
        for sw in self.switches.values():
            sw.stop()
