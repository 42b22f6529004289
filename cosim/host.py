"""The host side of the simulation: a cocotbext-pcie ``RootComplex`` behind the driver's
:class:`host_driver.transport.Transport` interface."""

import cocotb
from cocotb.triggers import Timer, First, Event
from cocotb.utils import get_sim_time

from cocotbext.pcie.core import RootComplex
from cocotbext.pcie.core.tlp import Tlp, TlpType, CplStatus
from cocotbext.pcie.core.utils import PcieId

from host_driver.transport import Transport, MsiVector, CplError

__all__ = ["RootComplexTransport"]

CFG_TIMEOUT_NS = 20_000
MB = 1 << 20


def _align(x, a):
    return (x + a - 1) // a * a


class RootComplexTransport(Transport):
    """``Transport`` over a cocotbext-pcie ``RootComplex`` with one card below a root port."""

    def __init__(self, rc: RootComplex, timeout_ns=CFG_TIMEOUT_NS):
        self.rc = rc
        self.timeout_ns = timeout_ns
        self._msi_count = {}
        self._msi_event = {}
        self._msi_vec = {}
        self._write_waiters = []         # (start, end, Event) of wait_host_write
        for t in (TlpType.MEM_WRITE, TlpType.MEM_WRITE_64):
            self._watch_writes(t)

    # ---- non-posted helper ----------------------------------------------------------------
    async def _nonposted(self, req, what):
        cpls = await self.rc.perform_nonposted_operation(req, self.timeout_ns, "ns")
        if not cpls:
            raise TimeoutError(f"{what}: no completion within {self.timeout_ns} ns")
        if cpls[0].status != CplStatus.SC:
            raise CplError(what, CplStatus(cpls[0].status).name)
        return cpls

    # ---- configuration ----------------------------------------------------------------------
    async def cfg_read(self, rid, offset, size=4):
        req = Tlp()
        req.fmt_type = TlpType.CFG_READ_1
        req.requester_id = PcieId(0, 0, 0)
        req.completer_id = PcieId.from_int(rid)
        req.set_addr_be(offset, size)
        cpls = await self._nonposted(req, f"config read {rid:04x}+{offset:#05x}")
        d = cpls[0].get_data()
        pad = offset & 3
        return int.from_bytes(d[pad:pad + size], "little")

    async def cfg_write(self, rid, offset, value, size=4):
        req = Tlp()
        req.fmt_type = TlpType.CFG_WRITE_1
        req.requester_id = PcieId(0, 0, 0)
        req.completer_id = PcieId.from_int(rid)
        req.set_addr_be_data(offset, value.to_bytes(size, "little"))
        await self._nonposted(req, f"config write {rid:04x}+{offset:#05x}")

    async def cfg_read_status(self, rid, offset):
        """Config read returning (status name, dword or None): for tests of error paths."""
        try:
            return "SC", await self.cfg_read(rid, offset, 4)
        except CplError as e:
            return e.status, None

    # ---- platform ---------------------------------------------------------------------------
    async def enumerate(self):
        await self.rc.enumerate()
        found = []

        def walk(bus):
            for dev in bus.devices:
                if dev.header_type == 0:
                    found.append(int(dev.pcie_id))
                if dev.subordinate:
                    walk(dev.subordinate)
        walk(self.rc.host_bridge.bus)
        return found

    def _bridge_above(self, bus_num):
        def walk(bus):
            for dev in bus.devices:
                if dev.subordinate is not None:
                    sub = dev.subordinate
                    if sub.bus_num <= bus_num <= sub.last_bus_num:
                        return walk(sub) or dev
            return None
        return walk(self.rc.host_bridge.bus)

    async def reserve_mmio(self, size, align, prefetchable=True, bus_num=1):
        """Grow the window of the root port above ``bus_num`` over a new range, as Linux does
        when it sizes SR-IOV BARs: the new window is written into the root port's registers
        with configuration writes, and the root complex's own decode is widened to match."""
        rp = self._bridge_above(bus_num)
        if rp is None:
            raise RuntimeError(f"no bridge above bus {bus_num}")
        if prefetchable:
            start = _align(rp.prefetchable_mem_limit + 1, max(align, MB))
            end = _align(start + size, MB)
            rp.prefetchable_mem_limit = end - 1
            ub = self.rc.upstream_bridge
            ub.prefetchable_mem_limit = max(ub.prefetchable_mem_limit, end - 1)
            self.rc.prefetchable_mem_limit = ub.prefetchable_mem_limit
        else:
            start = _align(rp.mem_limit + 1, max(align, MB))
            end = _align(start + size, MB)
            rp.mem_limit = end - 1
            ub = self.rc.upstream_bridge
            ub.mem_limit = max(ub.mem_limit, end - 1)
            self.rc.mem_limit = ub.mem_limit
        await rp.setup_bridge()
        return start

    # ---- MMIO -------------------------------------------------------------------------------
    async def mmio_read(self, addr, size=4):
        req = Tlp()
        req.fmt_type = TlpType.MEM_READ_64 if addr >> 32 else TlpType.MEM_READ
        req.requester_id = PcieId(0, 0, 0)
        req.set_addr_be(addr, size)
        cpls = await self._nonposted(req, f"memory read {addr:#x}")
        data = b"".join(bytes(c.get_data()) for c in cpls)
        pad = addr & 3
        return int.from_bytes(data[pad:pad + size], "little")

    async def mmio_write(self, addr, value, size=4):
        await self.rc.mem_write(addr, value.to_bytes(size, "little"))

    # ---- host memory ------------------------------------------------------------------------
    def alloc_host_mem(self, size):
        region = self.rc.mem_pool.alloc_region(size)
        return region.get_absolute_address(0)

    async def host_read(self, addr, length):
        return bytes(await self.rc.mem_address_space.read(addr, length))

    async def host_write(self, addr, data):
        await self.rc.mem_address_space.write(addr, data)

    def _watch_writes(self, fmt_type):
        """Wrap the root complex's handler of the device's memory writes: once a write has
        landed, wake the waiters whose range it touched."""
        handler = self.rc.rx_tlp_handler[fmt_type]

        async def on_write(tlp):
            await handler(tlp)
            if self._write_waiters:
                a, b = tlp.address, tlp.address + 4 * tlp.length
                keep = []
                for w in self._write_waiters:
                    if w[0] < b and a < w[1]:
                        w[2].set()
                    elif not w[2].is_set():
                        keep.append(w)
                self._write_waiters = keep
        self.rc.register_rx_tlp_handler(fmt_type, on_write)

    async def wait_host_write(self, addr, length, timeout_ns, poll_ns=500):
        ev = Event()
        w = (addr, addr + length, ev)
        self._write_waiters.append(w)
        await First(ev.wait(), Timer(max(1, int(timeout_ns)), "ns"))
        if w in self._write_waiters and not ev.is_set():
            self._write_waiters.remove(w)

    # ---- interrupts -------------------------------------------------------------------------
    def alloc_msi_vectors(self, n):
        out = []
        for v in self.rc.msi_alloc_vectors(n):
            self._msi_count[v.data] = 0
            self._msi_event[v.data] = Event()
            self._msi_vec[v.data] = v

            async def on_msi(d=v.data):
                self._msi_count[d] += 1
                self._msi_event[d].set()
            v.cb.append(on_msi)
            out.append(MsiVector(v.addr, v.data))
        return out

    def add_msi_callback(self, vector, fn):
        """Call ``fn()`` (plain, not a coroutine) on every message of MSI ``vector``."""
        async def cb():
            fn()
        self._msi_vec[vector.data].cb.append(cb)

    def msi_count(self, vector):
        return self._msi_count.get(vector.data, 0)

    async def wait_msi(self, vector, count, timeout_ns):
        deadline = get_sim_time("ns") + timeout_ns
        while self._msi_count[vector.data] < count:
            left = deadline - get_sim_time("ns")
            if left <= 0:
                return False
            ev = self._msi_event[vector.data]
            ev.clear()
            await First(ev.wait(), Timer(max(1, int(left)), "ns"))
        return True

    # ---- time -------------------------------------------------------------------------------
    async def sleep_ns(self, ns):
        await Timer(ns, "ns")

    def now_ns(self):
        return get_sim_time("ns")
