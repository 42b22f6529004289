"""The network between simulated servers: an Ethernet learning switch joining the cards' uplink
ports and an outside peer.

Each port is a :class:`cosim.uplink.Uplink` (a card's ``uplink_tx`` / ``uplink_rx``) or the
peer, a station outside the servers that the bench drives (:meth:`Fabric.from_peer`) and
whose received frames it reads (:attr:`Fabric.peer_rx`). Like a real switch the fabric learns
the source address of every frame on the port it came in by, sends a unicast frame with a
learned destination to that port only, and floods the others (broadcast, multicast, unknown)
to every port but the one it came in by. A guest that moves to another server is therefore
found there once it has sent a frame from its new place (:meth:`Fabric.announce`, the RARP
that a hypervisor sends for a migrated guest).

The switching decision itself (:class:`LearningTable`) is plain Python, tested without a
simulator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cocotb

__all__ = ["LearningTable", "Fabric", "PEER", "ETH_ANNOUNCE"]

PEER = "peer"
ETH_ANNOUNCE = 0x8035          # RARP: what a hypervisor sends for a guest that just moved


def _is_unicast(mac: bytes) -> bool:
    return not mac[0] & 1


@dataclass
class LearningTable:
    """Where each source address was last seen; which ports a frame goes out of."""
    ports: list[str] = field(default_factory=list)
    where: dict[bytes, str] = field(default_factory=dict)
    moves: int = 0                         # a known address seen on another port

    def add_port(self, name: str) -> None:
        if name in self.ports:
            raise ValueError(f"port {name!r} exists")
        self.ports.append(name)

    def switch(self, frame: bytes, ingress: str) -> list[str]:
        if len(frame) < 14:
            return []                      # a runt: no header to switch on
        dst, src = frame[:6], frame[6:12]
        if _is_unicast(src):
            old = self.where.get(src)
            if old is not None and old != ingress:
                self.moves += 1
            self.where[src] = ingress
        out = self.where.get(dst) if _is_unicast(dst) else None
        if out is not None:
            return [] if out == ingress else [out]
        return [p for p in self.ports if p != ingress]


class Fabric:
    """The switch in a cocotb bench. ``log`` keeps every (time ns, ingress, egress ports,
    frame) for the bench's checks."""

    def __init__(self, now_ns):
        self.table = LearningTable()
        self.table.add_port(PEER)
        self.uplinks = {}
        self.peer_rx: list[tuple[float, str, bytes]] = []      # (time ns, ingress, frame)
        self.now_ns = now_ns
        self._answer = None
        self.log: list[tuple[float, str, list[str], bytes]] = []

    def attach(self, name: str, uplink) -> None:
        """Join a card's uplink port as port ``name``."""
        self.table.add_port(name)
        self.uplinks[name] = uplink
        cocotb.start_soon(self._pump(name, uplink))

    async def _pump(self, name, uplink):
        while True:
            self._switch(await uplink.arrived.get(), name)

    def serve_peer(self, answer) -> None:
        """Let ``answer(frame) -> [reply, ...]`` be the peer: every frame that reaches it is
        answered at once (a :class:`cosim.netpeer.NetPeer`'s ``handle``: ARP, ICMP echo)."""
        self._answer = answer

    def from_peer(self, frame: bytes) -> None:
        self._switch(bytes(frame), PEER)

    def announce(self, mac: bytes, port: str) -> None:
        """A broadcast from ``mac`` entering at ``port``: the switch learns where it is now."""
        frame = b"\xff" * 6 + mac + ETH_ANNOUNCE.to_bytes(2, "big") + bytes(46)
        self.table.switch(frame, port)     # learning only; nobody needs the RARP itself

    def _switch(self, frame: bytes, ingress: str) -> None:
        out = self.table.switch(frame, ingress)
        self.log.append((self.now_ns(), ingress, out, frame))
        for port in out:
            if port == PEER:
                self.peer_rx.append((self.now_ns(), ingress, frame))
                if self._answer is not None:
                    for reply in self._answer(frame):
                        self._switch(bytes(reply), PEER)
            else:
                self.uplinks[port].send(frame)
