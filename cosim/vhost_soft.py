"""A software virtio-net device behind :class:`cosim.vhost_user.VhostUserServer`.

The reference back-end: what the simulated card's VF does, in plain Python. A QEMU guest's
virtio-net (``-netdev vhost-user``) sends frames on its TX queue (ring 1); we read them from
guest memory, give each to a :class:`cosim.netpeer.NetPeer`, and write the peer's answers into
the buffers of the RX queue (ring 0), each behind a 12-byte ``virtio_net_hdr_mrg_rxbuf``
(no offloads, ``num_buffers`` = 1); used rings are updated and the call eventfd signalled.

Features offered: ``VIRTIO_F_VERSION_1``, ``VIRTIO_NET_F_MRG_RXBUF`` (one buffer per frame
all the same) and, unless ``event_idx=False``, ``VIRTIO_RING_F_EVENT_IDX``: then interrupts
follow the driver's ``used_event`` and we publish ``avail_event`` so the driver kicks when it
adds buffers; without it the driver's ``VRING_AVAIL_F_NO_INTERRUPT`` is honoured. No
checksum or segmentation offloads, no indirect descriptors, split rings only.

Memory ordering: the guest runs on other CPUs. Stores to guest memory from Python are plain
stores in program order (x86 keeps store order); the two places where a store must be seen
before a later load (publish used idx / avail_event, then read the driver's event index or
avail idx) go through :func:`fence`, a lock-prefixed atomic (taking an uncontended lock). As
a safety net for lost notifications the stand-alone server also looks at the rings every
``--poll`` seconds.

A guest that breaks the ring rules (descriptor index out of range, a loop, a buffer outside
guest memory, a read-only RX buffer) gets its queue stopped with one log line, until the
front-end restarts it; nothing crashes.

Stand-alone: ``python -m cosim.vhost_soft --socket PATH --peer-ip 10.0.0.254``.
"""

from __future__ import annotations

import argparse
import collections
import logging
import signal
import struct
import threading
from dataclasses import asdict, dataclass
from typing import Optional

from cosim.netpeer import NetPeer
from cosim.vhost_user import GuestMemory, VhostUserDevice, VhostUserServer, Vring

__all__ = ["SoftNetDevice", "SplitRing", "RingError", "DeviceStats", "fence", "main",
           "RX", "TX", "VIRTIO_NET_HDR"]

log = logging.getLogger(__name__)

RX, TX = 0, 1
VIRTIO_F_VERSION_1 = 32
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_NET_F_MRG_RXBUF = 15

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1

DESC = struct.Struct("<QIHH")              # addr, len, flags, next
USED_ELEM = struct.Struct("<II")           # id, len
U16 = struct.Struct("<H")
#: virtio_net_hdr_mrg_rxbuf: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
#: num_buffers (virtio 1.x: always 12 bytes)
VIRTIO_NET_HDR = struct.Struct("<BBHHHHH")
RX_HEADER = VIRTIO_NET_HDR.pack(0, 0, 0, 0, 0, 0, 1)
MAX_PENDING_RX = 256

_FENCE = threading.Lock()


def fence() -> None:
    """A full memory barrier (store-load included): an uncontended lock is taken and released,
    which CPython does with lock-prefixed atomics."""
    _FENCE.acquire()
    _FENCE.release()


class RingError(Exception):
    """The driver broke the ring rules; the queue stops."""


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's ``vring_need_event``: did the index move from ``old`` to ``new`` past
    ``event``? (16-bit arithmetic)."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


class SplitRing:
    """The device side of one split virtqueue in guest memory.

    Starts at avail index ``vring.base`` and at the used index the used ring holds (so a
    ring stopped and restarted carries on). Buffers are completed in the order they were
    taken."""

    def __init__(self, memory: GuestMemory, vring: Vring, event_idx: bool) -> None:
        self.mem = memory
        self.vring = vring
        self.num = vring.num
        self.desc, self.avail, self.used = vring.desc, vring.avail, vring.used
        self.event_idx = event_idx
        self.last_avail = vring.base
        self.used_idx = self._u16(self.used + 2)
        self.signalled_used = self.used_idx     # used idx when the driver was last told
        self.broken: Optional[str] = None

    def _u16(self, gpa: int) -> int:
        return U16.unpack(self.mem.read(gpa, 2))[0]

    def avail_idx(self) -> int:
        return self._u16(self.avail + 2)

    def has_work(self) -> bool:
        return self.avail_idx() != self.last_avail

    def pop(self) -> Optional[int]:
        """The next available head descriptor index, or None."""
        avail_idx = self.avail_idx()
        pending = (avail_idx - self.last_avail) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.num:
            raise RingError(f"avail idx {avail_idx} is {pending} ahead of {self.last_avail}")
        head = self._u16(self.avail + 4 + 2 * (self.last_avail % self.num))
        if head >= self.num:
            raise RingError(f"head {head} out of a ring of {self.num}")
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return head

    def unpop(self) -> None:
        self.last_avail = (self.last_avail - 1) & 0xFFFF

    def chain(self, head: int) -> list[tuple[int, int, int]]:
        """(gpa, length, flags) of each descriptor of the chain from ``head``."""
        out, index = [], head
        for _ in range(self.num):
            addr, length, flags, nxt = DESC.unpack(self.mem.read(self.desc + 16 * index, 16))
            if flags & VRING_DESC_F_INDIRECT:
                raise RingError("indirect descriptor, not negotiated")
            if length and not self.mem.has_gpa(addr, length):
                raise RingError(f"buffer {addr:#x}+{length:#x} outside guest memory")
            out.append((addr, length, flags))
            if not flags & VRING_DESC_F_NEXT:
                return out
            if nxt >= self.num:
                raise RingError(f"next {nxt} out of a ring of {self.num}")
            index = nxt
        raise RingError(f"descriptor chain from {head} loops")

    def push(self, head: int, length: int) -> None:
        """Complete buffer ``head`` with ``length`` bytes written; the element first, then
        the index."""
        slot = self.used + 4 + 8 * (self.used_idx % self.num)
        self.mem.write(slot, USED_ELEM.pack(head, length))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.mem.write(self.used + 2, U16.pack(self.used_idx))

    def notify(self) -> bool:
        """Signal the driver if it wants to hear of the buffers used since last time."""
        old, new = self.signalled_used, self.used_idx
        if old == new:
            return False
        fence()                                 # our used idx before its event index
        if self.event_idx:
            wanted = need_event(self._u16(self.avail + 4 + 2 * self.num), new, old)
        else:
            wanted = not self._u16(self.avail) & VRING_AVAIL_F_NO_INTERRUPT
        self.signalled_used = new
        return self.vring.call() if wanted else False

    def arm(self) -> bool:
        """Ask for a kick when buffers past ``last_avail`` come; True if some are there
        already (then process again)."""
        if self.event_idx:
            self.mem.write(self.used + 4 + 8 * self.num, U16.pack(self.last_avail))
        fence()                                 # avail_event before reading avail idx
        return self.has_work()


@dataclass
class DeviceStats:
    tx_frames: int = 0
    tx_bytes: int = 0
    rx_frames: int = 0
    rx_bytes: int = 0
    rx_dropped: int = 0          # no room (queue full or frame larger than the buffer)
    kicks: int = 0
    calls: int = 0
    ring_errors: int = 0
    found_by_poll: int = 0       # poll() found TX buffers no kick had announced (yet)

    def as_dict(self) -> dict:
        return asdict(self)


class SoftNetDevice(VhostUserDevice):
    """virtio-net in software: TX frames to ``peer``, its answers to RX.

    ``poll()`` looks at both queues (for a periodic safety net); everything else is driven by
    the vhost-user callbacks. ``on_tx(frame)`` (if set) sees every frame the guest sent.
    ``offer_event_idx`` may be changed between connections (it is read at GET_FEATURES).
    Frames for the guest wait in ``rx_pending`` (at most 256) until it posts RX buffers."""

    HDR_LEN = VIRTIO_NET_HDR.size

    def __init__(self, peer: NetPeer, *, event_idx: bool = True) -> None:
        self.peer = peer
        self.offer_event_idx = event_idx
        self.features_acked = 0
        self.memory: Optional[GuestMemory] = None
        self.rings: dict[int, SplitRing] = {}
        self.rx_pending: collections.deque[bytes] = collections.deque()
        self.stats = DeviceStats()
        self.on_tx = None

    # -- vhost-user callbacks

    def features(self) -> int:
        f = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MRG_RXBUF)
        if self.offer_event_idx:
            f |= 1 << VIRTIO_RING_F_EVENT_IDX
        return f

    def num_queues(self) -> int:
        return 2

    def set_features(self, features: int) -> None:
        self.features_acked = features

    def set_mem_table(self, memory: GuestMemory) -> None:
        self.memory = memory
        for ring in self.rings.values():
            ring.mem = memory

    def vring_ready(self, index: int, vring: Vring) -> None:
        event_idx = bool(self.features_acked & (1 << VIRTIO_RING_F_EVENT_IDX))
        self.rings[index] = SplitRing(self.memory, vring, event_idx)
        log.info("queue %d ready: num=%d base=%d used=%d event_idx=%s", index, vring.num,
                 vring.base, self.rings[index].used_idx, event_idx)
        self._run(index)

    def get_vring_base(self, index: int) -> int:
        ring = self.rings.pop(index, None)
        return ring.last_avail if ring is not None else 0

    def kick(self, index: int) -> None:
        self.stats.kicks += 1
        self._run(TX if index == TX else RX)

    def disconnected(self) -> None:
        self.rings.clear()
        self.memory = None
        self.rx_pending.clear()

    def poll(self) -> None:
        """Process whatever both queues hold (the periodic safety net calls this)."""
        tx = self.rings.get(TX)
        if tx is not None and not tx.broken and tx.has_work():
            self.stats.found_by_poll += 1
        self._run(TX)
        self._run(RX)

    # -- queues

    def _run(self, index: int) -> None:
        ring = self.rings.get(index)
        if ring is None or ring.broken:
            return
        try:
            if index == TX:
                self._tx(ring)
            self._rx()
        except RingError as e:
            ring.broken = str(e)
            self.stats.ring_errors += 1
            log.error("queue %d stopped: %s", index, e)

    def _tx(self, ring: SplitRing) -> None:
        while True:
            while (head := ring.pop()) is not None:
                data = bytearray()
                for addr, length, flags in ring.chain(head):
                    if flags & VRING_DESC_F_WRITE:
                        raise RingError("writable descriptor in a TX chain")
                    data += self.memory.read(addr, length)
                ring.push(head, 0)
                if len(data) < self.HDR_LEN:
                    raise RingError(f"TX buffer of {len(data)} bytes, no room for the header")
                frame = bytes(data[self.HDR_LEN:])
                self.stats.tx_frames += 1
                self.stats.tx_bytes += len(frame)
                if self.on_tx is not None:
                    self.on_tx(frame)
                for reply in self.peer.handle(frame):
                    self.queue_rx(reply)
            if ring.notify():
                self.stats.calls += 1
            if not ring.arm():
                return

    def queue_rx(self, frame: bytes) -> None:
        """Deliver ``frame`` to the guest when an RX buffer is there (at most 256 wait)."""
        if len(self.rx_pending) >= MAX_PENDING_RX:
            self.rx_pending.popleft()
            self.stats.rx_dropped += 1
        self.rx_pending.append(frame)

    def _rx(self) -> None:
        ring = self.rings.get(RX)
        if ring is None or ring.broken:
            return
        try:
            while self.rx_pending:
                head = ring.pop()
                if head is None:
                    if not ring.arm():          # wait for the driver to add buffers
                        break
                    continue
                frame = self.rx_pending[0]
                chain = ring.chain(head)
                if any(not flags & VRING_DESC_F_WRITE for _, _, flags in chain):
                    raise RingError("read-only descriptor in an RX chain")
                if sum(length for _, length, _ in chain) < self.HDR_LEN + len(frame):
                    ring.unpop()
                    self.rx_pending.popleft()
                    self.stats.rx_dropped += 1
                    log.warning("RX frame of %d bytes does not fit buffer %d", len(frame), head)
                    break
                self._scatter(chain, RX_HEADER + frame)
                ring.push(head, self.HDR_LEN + len(frame))
                self.rx_pending.popleft()
                self.stats.rx_frames += 1
                self.stats.rx_bytes += len(frame)
        except RingError as e:
            ring.broken = str(e)
            self.stats.ring_errors += 1
            log.error("queue %d stopped: %s", RX, e)
        if ring.notify():
            self.stats.calls += 1

    def _scatter(self, chain: list[tuple[int, int, int]], data: bytes) -> None:
        pos = 0
        for addr, length, _ in chain:
            if pos >= len(data):
                break
            piece = data[pos:pos + length]
            self.memory.write(addr, piece)
            pos += len(piece)


def parse_mac(text: str) -> bytes:
    mac = bytes(int(x, 16) for x in text.split(":"))
    if len(mac) != 6:
        raise argparse.ArgumentTypeError(f"not a MAC address: {text}")
    return mac


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m cosim.vhost_soft",
        description="A software virtio-net vhost-user back-end: the guest's frames go to a "
                    "network peer that answers ARP and ping.")
    ap.add_argument("--socket", required=True, help="unix socket path to listen on")
    ap.add_argument("--peer-ip", default="10.0.0.254", help="the peer's IPv4 address "
                    "(default 10.0.0.254)")
    ap.add_argument("--peer-mac", type=parse_mac, default=parse_mac("02:00:00:00:00:fe"),
                    help="the peer's MAC address (default 02:00:00:00:00:fe)")
    ap.add_argument("--no-event-idx", action="store_true", help="do not offer EVENT_IDX")
    ap.add_argument("--poll", type=float, default=0.1,
                    help="seconds between looks at the rings without a kick (default 0.1)")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="log every vhost-user request at INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    peer = NetPeer(args.peer_mac, args.peer_ip)
    device = SoftNetDevice(peer, event_idx=not args.no_event_idx)
    server = VhostUserServer(args.socket, device, log_messages=args.verbose)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    log.info("serving %s, peer %s at %s", args.socket, args.peer_ip,
             ":".join(f"{b:02x}" for b in args.peer_mac))
    try:
        server.serve_forever(timeout_s=args.poll, tick=device.poll)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        log.info("device %s; peer %s", device.stats.as_dict(), peer.stats.as_dict())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
