"""Byte-level protocols beside the registers: the management UART's frames and the mailbox
words between the firmware and the host's management agent."""

__all__ = ["UartProto", "MboxMsg"]


class UartProto:
    """The management UART's framed protocol (hdl.mgmt.frames), 8N1, LSB first.

    Request (firmware to card)::

        0xA5  LEN  CMD  SEQ  PAYLOAD[LEN]  CRC

    Reply (card to firmware)::

        0x5A  LEN  CMD|0x80  SEQ  STATUS  PAYLOAD[LEN-1]  CRC

    ``LEN`` counts the payload bytes (the reply's status byte included); ``SEQ`` is echoed;
    ``CRC`` is CRC-8 (polynomial 0x07, initial value 0, no reflection) over ``LEN``, ``CMD``,
    ``SEQ`` and the payload. Commands:

    ========= ==== =========================== ============================================
    PING      0x01 (none)                      STATUS, CARD_ID (u32)
    READ      0x02 addr (u16)                  STATUS, data (u32)
    WRITE     0x03 addr (u16), data (u32)      STATUS
    ========= ==== =========================== ============================================

    ``addr`` is a byte offset in PF BAR2 (multi-byte fields little-endian); it must be DW
    aligned and inside BAR2 (else ``BAD_ADDR``). A frame with a bad CRC, a bad length or an
    unknown command, or one cut short (no byte for ``GAP_BITS`` bit times inside a frame), is
    not executed: the card waits for the line to be quiet for ``GAP_BITS`` bit times, then
    replies with ``CMD`` 0xFF, the status, and ``SEQ`` (0 when it never arrived).
    """
    SYNC_REQ = 0xA5
    SYNC_REPLY = 0x5A
    PING, READ, WRITE = 0x01, 0x02, 0x03
    ERROR = 0xFF
    OK, BAD_CRC, TRUNCATED, UNKNOWN_CMD, BAD_LEN, BAD_ADDR = 0, 1, 2, 3, 4, 5
    MAX_LEN = 6
    MAX_REPLY_LEN = 5        # STATUS + a u32: the longest reply any command gets
    GAP_BITS = 256
    CRC_POLY = 0x07

    @staticmethod
    def crc8(data: bytes) -> int:
        crc = 0
        for byte in data:
            crc ^= byte
            for _ in range(8):
                crc = ((crc << 1) ^ UartProto.CRC_POLY) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
        return crc


class MboxMsg:
    """Mailbox words between the firmware and the host's management agent (31-bit)::

        [30:24] op   [23:16] task   [15:0] arg

    Firmware to host: ``START`` (start the task's host-side management VM), ``STOP``.
    Host to firmware: ``READY`` (the VM runs and may own the task), ``STOPPED`` (the VM stopped
    and served all it had popped), ``REFUSED`` (unknown op or task; arg = the op refused).
    Request words in the task FIFOs share the op field; ``REQ_QOS_SET`` asks for a rate limit:
    ``[23:16]`` function, ``[15:0]`` rate in 1/256 byte per card clock.
    """
    START = 0x01
    STOP = 0x02
    READY = 0x11
    STOPPED = 0x12
    REFUSED = 0x13
    REQ_QOS_SET = 0x01
    VALID = 1 << 31            # set in a word popped from a FIFO or the mailbox
    WORD_MASK = VALID - 1

    @staticmethod
    def encode(op: int, task: int, arg: int = 0) -> int:
        if not 0 <= op < 0x80 or not 0 <= task < 0x100 or not 0 <= arg < 0x10000:
            raise ValueError(f"mailbox message out of range: op={op:#x} task={task} arg={arg:#x}")
        return op << 24 | task << 16 | arg

    @staticmethod
    def decode(word: int) -> tuple[int, int, int]:
        """``(op, task, arg)``; bit 31 (the valid flag) is ignored."""
        return (word >> 24) & 0x7F, (word >> 16) & 0xFF, word & 0xFFFF
