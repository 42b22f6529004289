"""The card's internal memory map: what its DMA channels and engines address inside the card.

Card addresses are byte addresses in one space that the DMA channels reach:

=================== ================================================================
0x00000 - 0x0FFFF   card memory that DMA descriptors name (``CARD_MEM_BYTES``)
0x10000 - 0x140FF   page-fault staging buffers (:class:`Staging`)
0x18000 - 0x18FFF   the virtio-net switch's frame buffers (:class:`PacketBuf`), their own RAM
=================== ================================================================

None of this is visible to the host as registers; the host sees a staging address only as a
number in a fault buffer queue entry.
"""

__all__ = ["Staging", "PacketBuf", "CARD_MEM_BYTES", "CARD_MEM_TOTAL", "CARD_SPACE",
           "CARD_ADDR_BITS", "PKT_BYTES", "PKT_WORDS"]


class Staging:
    """Staging buffers for payloads whose page is not present: card addresses above the 64 KiB
    that descriptors can name. A payload keeps its byte lane: it is staged at
    ``BASE + slot * STRIDE + (card address mod 32)``."""
    BASE = 0x10000
    STRIDE = 0x1040
    SLOTS = 4
    TOP = BASE + SLOTS * STRIDE


class PacketBuf:
    """The virtio-net switch's frame buffers: card addresses the DMA channels reach, in their own
    block RAM. Slot 0 holds a frame a function sent, slot 1 one that came in on the uplink. A
    frame's 12-byte virtio_net_hdr is placed so that the Ethernet frame starts on a word."""
    BASE = 0x18000
    SLOT = 0x800
    SLOTS = 2
    NET_HDR = 12
    MIN_FRAME = 14            # an Ethernet header
    MAX_FRAME = 1514 + 4      # without FCS; plus a VLAN tag


CARD_MEM_BYTES = 64 * 1024            # what descriptors may name
CARD_MEM_TOTAL = Staging.TOP           # plus the page-fault staging buffers above it
CARD_SPACE = PacketBuf.BASE + PacketBuf.SLOT * PacketBuf.SLOTS   # and the frame buffers
CARD_ADDR_BITS = 17

PKT_BYTES = PacketBuf.SLOT * PacketBuf.SLOTS


def PKT_WORDS(data_width):
    return PKT_BYTES * 8 // data_width
