"""firmware.link: a late reply (to a request of a firmware process killed while the card was
answering it) is passed over, the caller's own reply is taken; a link that gets no reply of its
own within the timeout says so in one line."""

import struct

import pytest
from firmware.link import LinkError, UartLink
from firmware.protocol import P, crc8


def reply(seq, value, cmd=P.READ):
    body = bytes([5, cmd | 0x80, seq, P.OK]) + struct.pack("<I", value)
    return bytes([P.SYNC_REPLY]) + body + bytes([crc8(body)])


class FakePort:
    """A card that answers each read with ``answer(addr)``, after the late replies queued in
    ``late`` (they arrive once the request is out, as on the wire)."""

    def __init__(self, late=(), answer=lambda addr: 0x1234_0000 | addr, silent=False):
        self.late = list(late)
        self.answer = answer
        self.silent = silent
        self.rx = bytearray()

    def reset_input_buffer(self):
        self.rx.clear()

    def write(self, frame):
        seq, addr = frame[3], struct.unpack("<H", frame[4:6])[0]
        self.rx += b"".join(self.late)
        self.late = []
        if not self.silent:
            self.rx += reply(seq, self.answer(addr))

    def flush(self):
        pass

    def read(self, n):
        out, self.rx[:n] = bytes(self.rx[:n]), b""
        return out

    def close(self):
        pass


def test_late_replies_are_passed_over():
    port = FakePort(late=[reply(28, 0xDEAD), reply(29, 0xBEEF)])
    link = UartLink("fake", port=port)
    assert link.read(0x408) == 0x1234_0408
    assert link.read(0x40C) == 0x1234_040C
    assert (link.stale, link.round_trips) == (2, 2)


def test_a_late_reply_alone_is_not_taken_for_the_answer():
    port = FakePort(late=[reply(7, 0xDEAD)], silent=True)
    link = UartLink("fake", port=port, timeout=0.01)
    link._seq = 40                                  # (the next request is sequence 41)
    with pytest.raises(LinkError, match="no reply from the card") as e:
        link.read(0x408)
    assert "\n" not in str(e.value) and link.stale == 1


@pytest.mark.parametrize("cut", range(1, 10))
def test_the_tail_of_a_reply_cut_by_a_process_s_death_is_skipped(cut):
    """A firmware process killed while the card sent a reply leaves its tail on the line for
    the next process. The tail holds the sync value (0x5A in the data): a reader that took it
    for a frame start waited for a length the line never delivers, or took the real reply's
    first bytes as the fragment's rest. The scan skips such a candidate and finds the reply."""
    late = reply(28, 0x5A5A_5A5A)
    port = FakePort(late=[late[cut:]])
    link = UartLink("fake", port=port, timeout=0.01)
    assert link.read(0x408) == 0x1234_0408
    assert link.read(0x40C) == 0x1234_040C


def test_line_noise_with_sync_values_and_a_bad_frame_before_the_reply():
    bad = bytearray(reply(41, 0xDEAD))
    bad[-1] ^= 0xFF                                 # a CRC that does not hold
    noise = bytes([P.SYNC_REPLY, 0xF0, 0x00, P.SYNC_REPLY, 0x00, P.SYNC_REPLY])
    port = FakePort(late=[noise, bytes(bad)])
    link = UartLink("fake", port=port, timeout=0.01)
    link._seq = 40
    assert link.read(0x408) == 0x1234_0408
    assert link.skipped >= 4 and link.stale == 0


def test_a_damaged_reply_alone_is_no_reply():
    """A damaged reply to this very request is skipped too: the request may have run, so the
    link says it got no reply (no retry) rather than taking a damaged one."""
    class Damaging(FakePort):
        def write(self, frame):
            super().write(frame)
            self.rx[-1] ^= 0xFF
    link = UartLink("fake", port=Damaging(), timeout=0.01)
    with pytest.raises(LinkError, match="no reply from the card"):
        link.read(0x408)
    assert link.retried == 0


class BusyCard(FakePort):
    """A card still sending a dead process's reply when the new process starts: the first
    ``lost`` requests arrive while it replies and are lost (the late reply comes instead)."""

    def __init__(self, lost, late_seq=28):
        super().__init__()
        self.lost, self.late_seq, self.pings = lost, late_seq, 0

    def write(self, frame):
        self.pings += 1
        if self.lost:
            self.lost -= 1
            self.rx += reply(self.late_seq, 0xDEAD)
            self.late_seq += 1
            return
        self.rx += reply(frame[3], 0x0FFC_CA4D, cmd=frame[2])


@pytest.mark.parametrize("lost", [0, 1, 3])
def test_sync_pings_until_its_own_ping_is_answered(lost):
    port = BusyCard(lost)
    link = UartLink("fake", port=port, timeout=0.01)
    assert link.sync() == 0x0FFC_CA4D
    assert port.pings == lost + 1 and link.stale == lost


def test_sync_gives_up_in_one_line():
    link = UartLink("fake", port=BusyCard(100), timeout=0.01)
    with pytest.raises(LinkError, match="never answered a ping") as e:
        link.sync(attempts=4)
    assert "\n" not in str(e.value)
