"""The firmware's link to the card: request/reply frames over a serial port (pyserial).

``UartLink(url)`` opens anything ``serial.serial_for_url`` opens: a ``socket://host:port`` or a
pty path for the simulated card, ``/dev/ttyUSB0`` for a board. Every call is one request frame
and one reply frame (a *round trip*, counted in :attr:`UartLink.round_trips`).

Retries are only made when the card's error reply proves the request was not executed (bad CRC
or cut short on the way in). A reply that never comes, or comes damaged (it is then skipped
like line noise, and no reply of this request's comes), raises :class:`LinkError` without a
retry: the request may have run, and a second run of a side-effecting access (a push, a pop)
would duplicate or lose a request.

A reply with another sequence number is a late one: the card answers in order, so it belongs to
a request made before this one (by a firmware process that was killed while the card was still
answering it, say) and is passed over (counted in :attr:`UartLink.stale`). The sequence starts
at a random number, so a new process does not begin where a dead one was likely to stand.
"""

import os

import serial

from .protocol import P, FrameError, Reply, parse_reply, ping_request, read_request, write_request, \
    STATUS_NAMES

__all__ = ["UartLink", "LinkError"]


class LinkError(Exception):
    pass


class UartLink:
    def __init__(self, url: str, *, baudrate=115200, timeout=5.0, retries=3, port=None):
        try:
            self.port = port if port is not None else serial.serial_for_url(
                url, baudrate=baudrate, timeout=timeout)
        except (serial.SerialException, ValueError) as e:
            raise LinkError(f"cannot open {url}: {e}") from None
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.round_trips = 0
        self.retried = 0
        self.stale = 0                 # late replies passed over
        self.skipped = 0               # candidate frames that were not replies (resync)
        self._rx = bytearray()
        self._seq = os.urandom(1)[0]

    def close(self):
        self.port.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _next_reply(self) -> Reply:
        """The next well-formed reply frame on the line.

        Bytes before a sync byte are skipped (line noise, the tail of a reply whose start went to
        a firmware process that died). A candidate that is not a reply (an impossible length, a
        bad CRC: a sync value inside such a tail, or a damaged frame) is skipped from its sync
        byte on, and the scan goes on in the bytes after it, so a reply right behind the
        fragment is still found. Raises :class:`LinkError` when no reply completes within the
        timeout."""
        buf = self._rx
        while True:
            i = buf.find(P.SYNC_REPLY)
            del buf[:len(buf) if i < 0 else i]
            need = 2
            if len(buf) >= 2:
                n = buf[1]
                if not 1 <= n <= P.MAX_REPLY_LEN:
                    del buf[:1]
                    self.skipped += 1
                    continue
                need = n + 5
                if len(buf) >= need:
                    try:
                        reply = parse_reply(bytes(buf[:need]))
                    except FrameError:
                        del buf[:1]
                        self.skipped += 1
                        continue
                    del buf[:need]
                    return reply
            got = self.port.read(need - len(buf))
            if not got:
                raise LinkError(f"{self.url}: no reply from the card within {self.timeout} s")
            buf += got

    def _send(self, build) -> int:
        """Send ``build(seq)`` with the next sequence number on a fresh line; returns it."""
        self._seq = (self._seq + 1) & 0xFF
        self.port.reset_input_buffer()
        self._rx.clear()
        self.port.write(build(self._seq))
        self.port.flush()
        return self._seq

    def _transact(self, build, what):
        for attempt in range(self.retries + 1):
            seq = self._send(build)
            while True:
                reply = self._next_reply()
                if reply.seq == seq:
                    break
                self.stale += 1            # a late reply to an earlier request
            self.round_trips += 1
            if reply.error and reply.status in (P.BAD_CRC, P.TRUNCATED) \
                    and attempt < self.retries:
                self.retried += 1          # the card dropped the request unexecuted
                continue
            if reply.status == P.OK and not reply.error:
                return reply
            raise LinkError(f"{self.url}: {what}: card says "
                            f"{STATUS_NAMES.get(reply.status, hex(reply.status))}")
        raise AssertionError("unreachable")

    def sync(self, attempts: int = 16) -> int:
        """Make the line this process's before its first real request; returns the card's ID.

        A new firmware process may start while the card still sends the reply to a request of
        a process that died; the card holds one received byte while it replies, so a request
        sent then may be lost (no reply, or only an error reply with another sequence number).
        A ping has no side effect, so it is sent again at once whenever a reply to an earlier
        request comes instead of its own; once the newest ping is answered the card has
        nothing else under way (it answers in order)."""
        for _ in range(attempts):
            seq = self._send(ping_request)
            reply = self._next_reply()
            self.round_trips += 1
            if reply.seq == seq and not reply.error and reply.status == P.OK:
                return reply.value
            self.stale += 1                # an earlier request's (or a broken frame's) reply
        raise LinkError(f"{self.url}: the card never answered a ping of its own "
                        f"in {attempts} tries")

    def ping(self) -> int:
        """The card's identification word (``MgmtRegs.CARD_ID``)."""
        return self._transact(ping_request, "ping").value

    def read(self, addr: int) -> int:
        return self._transact(lambda s: read_request(s, addr), f"read {addr:#x}").value

    def write(self, addr: int, value: int) -> None:
        self._transact(lambda s: write_request(s, addr, value), f"write {addr:#x}")
