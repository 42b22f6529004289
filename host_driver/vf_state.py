"""A function's virtio device state on the card: stop it, read it out, write it back, go on.

The card keeps the state a virtio-net function needs to resume in two places:

* what its driver programmed (features, device status, the config and queue vectors, queue
  sizes, enables and ring addresses, the MSI-X table): read through the function's own BAR0
  and written back by replaying the driver's bring-up in order (reset, ACKNOWLEDGE | DRIVER,
  features, FEATURES_OK, queues, then the saved status with DRIVER_OK);
* what only the device knows (each queue's ``last_avail`` and ``used`` index, through
  ``MigRegs.Q_SEL``, and the pending transmit notifications): PF BAR2 :class:`regmap.MigRegs`,
  writable while the function is stopped and idle;
* what the PF driver gave it: its MAC address in the card's switch (``MigRegs.MAC_LO/HI``)
  and each queue's own used-ring coalescing (``NetRegs.COAL_Q``), which move with the guest.

:class:`CardVfState` implements ``quiesce`` / ``export_state`` / ``import_state`` / ``resume``
on a real card (through any :class:`host_driver.transport.Transport`). The blob is versioned:
``magic "VFST", version, function index``, then the fields in a fixed order (little-endian).
"""

import struct
from regmap import MigRegs as MG, NetRegs, VirtioRegs as V, Bar0Map

__all__ = ["CardVfState", "VfStateError", "STATE_VERSION"]

MAGIC = b"VFST"
STATE_VERSION = 4                           # 2: the MAC address joined the device fields;
                                            # 3: each queue's coalescing (NetRegs.COAL_Q);
                                            # 4: every queue of the function (NUM_QUEUES_VALUE:
                                            # the pairs and the control queue), not two
_HEAD = struct.Struct("<4sHH")              # magic, version, function index
_DEV = struct.Struct("<BQH6s")              # device status, driver features, config vector,
                                            # MAC address
_QUEUE = struct.Struct("<HHHQQQHHI")        # size, vector, enable, desc, driver, device,
                                            # last_avail, used, coalescing
_TAIL = struct.Struct("<BB")                # tx pending, MSI-X vectors that follow
_MSIX = struct.Struct("<IIII")              # address lo, hi, data, vector control


class VfStateError(Exception):
    pass


class CardVfState:
    """``drv`` is the card's :class:`host_driver.offcard.OffcardDriver` (PF BAR2 access);
    functions are :class:`host_driver.offcard.OffcardFunction` objects with BAR0 mapped."""

    def __init__(self, drv, idle_timeout_ns=200_000, poll_ns=500):
        self.drv = drv
        self.idle_timeout_ns = idle_timeout_ns
        self.poll_ns = poll_ns

    # ---- register helpers ----
    async def _r(self, fn, off, size):
        return await fn.t.mmio_read(fn.bar0 + off, size)

    async def _w(self, fn, off, value, size):
        await fn.t.mmio_write(fn.bar0 + off, value, size)

    async def _sel(self, fn):
        await self.drv.mgmt_write(MG.SEL, fn.index)

    async def _r64(self, fn, off):
        return await self._r(fn, off, 4) | await self._r(fn, off + 4, 4) << 32

    async def _w64(self, fn, off, value):
        await self._w(fn, off, value & 0xFFFF_FFFF, 4)
        await self._w(fn, off + 4, value >> 32, 4)

    # ---- the function's MAC address in the card's switch ----
    async def mac(self, fn) -> bytes:
        await self._sel(fn)
        lo, hi = await self.drv.mgmt_read(MG.MAC_LO), await self.drv.mgmt_read(MG.MAC_HI)
        return (lo | (hi & 0xFFFF) << 32).to_bytes(6, "little")

    async def set_mac(self, fn, mac: bytes):
        """Give ``fn`` the address ``mac`` (a multicast one retires its entry)."""
        if len(mac) != 6:
            raise VfStateError(f"a MAC address has 6 bytes, not {len(mac)}")
        await self._sel(fn)
        await self.drv.mgmt_write(MG.MAC_LO, int.from_bytes(mac[:4], "little"))
        await self.drv.mgmt_write(MG.MAC_HI, int.from_bytes(mac[4:], "little"))

    # ---- the contract ----
    async def quiesce(self, fn):
        """Stop the function's queues and wait until the engine holds none of its work."""
        await self._sel(fn)
        await self.drv.mgmt_write(MG.CTRL, 1)
        await self._wait_idle(fn, "after the stop")

    async def _wait_idle(self, fn, when):
        """Until the (selected, stopped) function reads idle. A stopped function is not idle
        for a few clocks now and then: while the engine drops a frame addressed to it."""
        t0 = fn.t.now_ns()
        while True:
            status = await self.drv.mgmt_read(MG.STATUS)
            if not status & 1:
                raise VfStateError(f"{fn}: not stopped {when}")
            if status & 2:
                return
            if fn.t.now_ns() - t0 > self.idle_timeout_ns:
                raise VfStateError(f"{fn}: not idle {self.idle_timeout_ns} ns {when}")
            await fn.t.sleep_ns(self.poll_ns)

    async def read_indices(self, fn, q):
        """Queue ``q``'s device indices (``last_avail``, ``used``) of function ``fn``."""
        await self._sel(fn)
        await self.drv.mgmt_write(MG.Q_SEL, q)
        return await self.drv.mgmt_read(MG.Q_AVAIL), await self.drv.mgmt_read(MG.Q_USED)

    async def write_indices(self, fn, indices, tx_pending=None):
        """The device's ring indices, ``{queue: (last_avail, used)}``, and pending transmit
        notifications of the stopped function ``fn``. The card takes them only while the
        function is idle and ignores them otherwise, so each one is read back and written
        again until it holds."""
        await self._sel(fn)
        got = {}
        for attempt in range(8):
            await self._wait_idle(fn, "to take its indices")
            ok = True
            for q, (avail, used) in indices.items():
                await self.drv.mgmt_write(MG.Q_SEL, q)
                await self.drv.mgmt_write(MG.Q_AVAIL, avail)
                await self.drv.mgmt_write(MG.Q_USED, used)
                got[q] = (await self.drv.mgmt_read(MG.Q_AVAIL), await self.drv.mgmt_read(MG.Q_USED))
                ok &= got[q] == (avail & 0xFFFF, used & 0xFFFF)
            if tx_pending is not None:
                await self.drv.mgmt_write(MG.TX_PEND, tx_pending)
                got["tx_pending"] = await self.drv.mgmt_read(MG.TX_PEND)
                ok &= got["tx_pending"] == tx_pending & 1
            if ok:
                return
        raise VfStateError(f"{fn}: the card kept ignoring its indices (wrote {indices}, "
                           f"pending {tx_pending}; reads {got})")

    async def resume(self, fn):
        """Let the function run again. Its transmit queue is looked at once first (a pending
        notification is set while it is still stopped), as a hypervisor kicks every queue
        after loading a device state: the guest may have queued frames, and rung a doorbell
        that went unheard, after the state was saved."""
        await self._sel(fn)
        await self.drv.mgmt_write(MG.TX_PEND, 1)
        await self.drv.mgmt_write(MG.CTRL, 0)

    async def export_state(self, fn) -> bytes:
        """The function's state (it must be quiesced)."""
        await self._sel(fn)
        await self._wait_idle(fn, "for its export")
        c = V.COMMON
        status = await self._r(fn, c + V.STATUS, 1)
        feats = 0
        for word in (0, 1):
            await self._w(fn, c + V.GFSELECT, word, 4)
            feats |= await self._r(fn, c + V.GF, 4) << (32 * word)
        out = [_HEAD.pack(MAGIC, STATE_VERSION, fn.index),
               _DEV.pack(status, feats, await self._r(fn, c + V.MSIX_CONFIG, 2),
                         await self.mac(fn))]
        for q in range(V.NUM_QUEUES_VALUE):
            await self._w(fn, c + V.Q_SELECT, q, 2)
            avail, used = await self.read_indices(fn, q)
            out.append(_QUEUE.pack(
                await self._r(fn, c + V.Q_SIZE, 2), await self._r(fn, c + V.Q_MSIX, 2),
                await self._r(fn, c + V.Q_ENABLE, 2), await self._r64(fn, c + V.Q_DESC),
                await self._r64(fn, c + V.Q_DRIVER), await self._r64(fn, c + V.Q_DEVICE),
                avail, used, await self.drv.mgmt_read(NetRegs.COAL_Q + 4 * q)))
        nvec = len(fn.msix_vectors)
        out.append(_TAIL.pack(await self.drv.mgmt_read(MG.TX_PEND), nvec))
        table = fn.bar0 + fn.msix_table_off if nvec else 0
        for k in range(nvec):
            out.append(_MSIX.pack(*[await fn.t.mmio_read(table + 16 * k + 4 * i, 4)
                                    for i in range(4)]))
        return b"".join(out)

    @staticmethod
    def parse(blob: bytes) -> dict:
        """Check and unpack a blob (no card access)."""
        need = _HEAD.size + _DEV.size + V.NUM_QUEUES_VALUE * _QUEUE.size + _TAIL.size
        if len(blob) < need:
            raise VfStateError(f"state blob of {len(blob)} bytes, at least {need} expected")
        magic, version, fidx = _HEAD.unpack_from(blob, 0)
        if magic != MAGIC:
            raise VfStateError(f"state blob magic {magic!r}, expected {MAGIC!r}")
        if version != STATE_VERSION:
            raise VfStateError(f"state blob version {version}, this driver restores {STATE_VERSION}")
        off = _HEAD.size
        status, feats, cfgvec, mac = _DEV.unpack_from(blob, off)
        off += _DEV.size
        queues = []
        for _ in range(V.NUM_QUEUES_VALUE):
            queues.append(_QUEUE.unpack_from(blob, off))
            off += _QUEUE.size
        txpend, nvec = _TAIL.unpack_from(blob, off)
        off += _TAIL.size
        if len(blob) != off + nvec * _MSIX.size:
            raise VfStateError(f"state blob of {len(blob)} bytes, {off + nvec * _MSIX.size} "
                               f"expected for {nvec} MSI-X vectors")
        msix = [_MSIX.unpack_from(blob, off + k * _MSIX.size) for k in range(nvec)]
        return {"fidx": fidx, "status": status, "features": feats, "config_vector": cfgvec,
                "mac": mac,
                "queues": queues, "tx_pending": txpend, "msix": msix}

    async def import_state(self, fn, blob: bytes, rehome_msix: bool = False):
        """Write a state back into ``fn`` (any function of the same card type): the function
        is stopped first and stays stopped until :meth:`resume`.

        ``rehome_msix``: ``fn`` is on another host (a live migration): its MSI-X entries take
        the message address and data of that host's own vectors (``fn.msix_vectors``, set up
        by the target hypervisor) and keep the saved mask bits, as interrupt remapping does."""
        st = self.parse(blob)
        if (rehome_msix or fn.msix_vectors) and len(st["msix"]) > len(fn.msix_vectors):
            raise VfStateError(f"{fn}: state has {len(st['msix'])} MSI-X vectors, "
                               f"the function {len(fn.msix_vectors)}")
        await self.quiesce(fn)
        c = V.COMMON
        await self._w(fn, c + V.STATUS, 0, 1)                       # reset
        await self._w(fn, c + V.STATUS, V.S_ACKNOWLEDGE | V.S_DRIVER, 1)
        for word in (0, 1):
            await self._w(fn, c + V.GFSELECT, word, 4)
            await self._w(fn, c + V.GF, (st["features"] >> (32 * word)) & 0xFFFF_FFFF, 4)
        await self._w(fn, c + V.STATUS, V.S_ACKNOWLEDGE | V.S_DRIVER | V.S_FEATURES_OK, 1)
        if not (await self._r(fn, c + V.STATUS, 1)) & V.S_FEATURES_OK:
            raise VfStateError(f"{fn}: the saved features were refused")
        await self._w(fn, c + V.MSIX_CONFIG, st["config_vector"], 2)
        for q, (size, vec, en, desc, drv_, dev, *_) in enumerate(st["queues"]):
            await self._w(fn, c + V.Q_SELECT, q, 2)
            await self._w(fn, c + V.Q_SIZE, size, 2)
            await self._w(fn, c + V.Q_MSIX, vec, 2)
            await self._w64(fn, c + V.Q_DESC, desc)
            await self._w64(fn, c + V.Q_DRIVER, drv_)
            await self._w64(fn, c + V.Q_DEVICE, dev)
            await self._w(fn, c + V.Q_ENABLE, en, 2)
        if st["msix"]:
            table = fn.bar0 + fn.msix_table_off
            for k, entry in enumerate(st["msix"]):
                if rehome_msix:
                    mine = fn.msix_vectors[k]
                    entry = (mine.addr & 0xFFFF_FFFF, mine.addr >> 32, mine.data, entry[3])
                for i, v in enumerate(entry):
                    await fn.t.mmio_write(table + 16 * k + 4 * i, v, 4)
        await self.set_mac(fn, st["mac"])
        for q, (*_, coal) in enumerate(st["queues"]):
            await self.drv.mgmt_write(NetRegs.COAL_Q + 4 * q, coal)     # (set_mac selected fn)
        await self._w(fn, c + V.STATUS, st["status"], 1)
        # the device's indices last: the engine clears a pending transmit notification of a
        # function that is not live, so they go in once the status is back (it stays stopped)
        await self.write_indices(fn, {q: (avail, used) for q, (*_, avail, used, _)
                                      in enumerate(st["queues"])}, st["tx_pending"])
