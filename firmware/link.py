"""The firmware's link to the card: request/reply frames over a serial port (pyserial).

``UartLink(url)`` opens anything ``serial.serial_for_url`` opens: a ``socket://host:port`` or a
pty path for the simulated card, ``/dev/ttyUSB0`` for a board. Every call is one request frame
and one reply frame (a *round trip*, counted in :attr:`UartLink.round_trips`).

Retries are only made when the card's error reply proves the request was not executed (bad CRC
or cut short on the way in). A reply that never comes, or comes damaged, raises
:class:`LinkError` without a retry: the request may have run, and a second run of a
side-effecting access (a push, a pop) would duplicate or lose a request.

A reply with another sequence number is a late one: the card answers in order, so it belongs to
a request made before this one (by a firmware process that was killed while the card was still
answering it, say) and is passed over (counted in :attr:`UartLink.stale`). The sequence starts
at a random number, so a new process does not begin where a dead one was likely to stand.
"""

import os

import serial

from .protocol import P, FrameError, parse_reply, ping_request, read_request, write_request, \
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
        self._seq = os.urandom(1)[0]

    def close(self):
        self.port.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read_reply(self) -> bytes:
        # skip anything before the sync byte (line noise, a late reply)
        while True:
            b = self.port.read(1)
            if not b:
                raise LinkError(f"{self.url}: no reply from the card within {self.timeout} s")
            if b[0] == P.SYNC_REPLY:
                break
        head = self.port.read(1)
        if not head:
            raise LinkError(f"{self.url}: reply cut short")
        rest = self.port.read(head[0] + 3)
        if len(rest) != head[0] + 3:
            raise LinkError(f"{self.url}: reply cut short")
        return bytes([P.SYNC_REPLY]) + head + rest

    def _transact(self, build, what):
        for attempt in range(self.retries + 1):
            self._seq = (self._seq + 1) & 0xFF
            seq = self._seq
            self.port.reset_input_buffer()
            self.port.write(build(seq))
            self.port.flush()
            while True:
                try:
                    reply = parse_reply(self._read_reply())
                except FrameError as e:
                    raise LinkError(f"{self.url}: {what}: damaged reply ({e})") from None
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

    def ping(self) -> int:
        """The card's identification word (``MgmtRegs.CARD_ID``)."""
        return self._transact(ping_request, "ping").value

    def read(self, addr: int) -> int:
        return self._transact(lambda s: read_request(s, addr), f"read {addr:#x}").value

    def write(self, addr: int, value: int) -> None:
        self._transact(lambda s: write_request(s, addr, value), f"write {addr:#x}")
