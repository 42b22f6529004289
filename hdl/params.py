"""Elaboration parameters of the card and its fixed address map."""

from dataclasses import dataclass, field, asdict

__all__ = ["CardConfig", "FuncRegs", "MgmtRegs", "Bar0Map", "DmaRegs", "IommuRegs", "FaultRegs",
           "Staging", "PTE_PRESENT", "PAGE_SHIFT", "DescStatus", "VirtioRegs", "VirtioCaps",
           "PacketBuf", "NetRegs", "MgmtBlockRegs", "Owner", "UartProto", "MboxMsg", "MigRegs"]


class Bar0Map:
    """Layout of BAR0 of every function (PF and VF alike), byte offsets."""
    FUNC_REGS = 0x0000   # hdl.func_regs
    VIRTIO    = 0x1000   # reserved for the virtio-pci structures
    MSIX_TABLE = 0x2000  # 16 bytes per vector
    MSIX_PBA  = 0x3000   # one bit per vector
    SIZE      = 0x4000


class VirtioRegs:
    """The virtio-pci modern structures in BAR0 of every function (byte offsets), and the
    virtio-net device's features. Layouts follow the virtio 1.x specification, section 4.1."""
    COMMON = 0x1000          # struct virtio_pci_common_cfg
    COMMON_LEN = 0x38
    NOTIFY = 0x1100          # queue notify registers: queue n at NOTIFY + n * NOTIFY_MULT
    NOTIFY_MULT = 4
    NOTIFY_LEN = 0x100
    ISR = 0x1200             # u8, read-to-clear: bit 0 queue interrupt, bit 1 config change
    ISR_LEN = 4
    DEVICE = 0x1300          # struct virtio_net_config
    DEVICE_LEN = 0x10
    # common cfg field offsets (relative to COMMON)
    DFSELECT = 0x00
    DF = 0x04
    GFSELECT = 0x08
    GF = 0x0C
    MSIX_CONFIG = 0x10       # u16; NUM_QUEUES u16 at 0x12
    NUM_QUEUES = 0x12
    STATUS = 0x14            # u8; CONFIG_GENERATION u8 at 0x15; QUEUE_SELECT u16 at 0x16
    CFG_GENERATION = 0x15
    Q_SELECT = 0x16
    Q_SIZE = 0x18            # u16; Q_MSIX_VECTOR u16 at 0x1A
    Q_MSIX = 0x1A
    Q_ENABLE = 0x1C          # u16; Q_NOTIFY_OFF u16 at 0x1E
    Q_NOTIFY_OFF = 0x1E
    Q_DESC = 0x20            # u64
    Q_DRIVER = 0x28          # u64 (available ring)
    Q_DEVICE = 0x30          # u64 (used ring)
    # device status bits
    S_ACKNOWLEDGE = 1
    S_DRIVER = 2
    S_DRIVER_OK = 4
    S_FEATURES_OK = 8
    S_NEEDS_RESET = 64
    S_FAILED = 128
    NO_VECTOR = 0xFFFF
    # features offered
    F_NET_MAC = 5
    F_NET_MRG_RXBUF = 15
    F_NET_STATUS = 16
    F_RING_INDIRECT_DESC = 28
    F_RING_EVENT_IDX = 29
    F_VERSION_1 = 32
    FEATURES = ((1 << F_NET_MAC) | (1 << F_NET_MRG_RXBUF) | (1 << F_NET_STATUS)
                | (1 << F_RING_INDIRECT_DESC) | (1 << F_RING_EVENT_IDX) | (1 << F_VERSION_1))
    NUM_QUEUES_VALUE = 2     # receiveq1, transmitq1 (the layout leaves room for more pairs)
    QUEUE_SIZE_MAX = 256
    # virtio_net_config
    NET_MAC = 0x00           # 6 bytes: 02:0f:fc:00:00:<function index>
    NET_STATUS = 0x06        # u16: bit 0 link up
    NET_MAX_PAIRS = 0x08     # u16: 1
    MAC_PREFIX = bytes([0x02, 0x0F, 0xFC, 0x00, 0x00])


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


class NetRegs:
    """PF BAR2: the virtio-net switch's counters (hdl.virtio_net), 32-bit, wrapping."""
    TX_FRAMES    = 0x300   # frames taken from transmit queues
    RX_FRAMES    = 0x304   # frames delivered into receive queues
    UPLINK_OUT   = 0x308   # frames sent to the uplink port (broadcast, multicast, unknown)
    UPLINK_IN    = 0x30C   # frames taken from the uplink port
    DROP_NOBUF   = 0x310   # no receive buffer (or the receiving function not live; or the
                           # ring ran dry in mid-frame with MRG_RXBUF)
    DROP_BAD     = 0x314   # a malformed queue: the function was set NEEDS_RESET
    DROP_UNKNOWN = 0x318   # an uplink frame for no function (CTRL.DEFAULT_PF clear), or sent to itself
    DROP_SIZE    = 0x31C   # runt, oversized, or a receive buffer too small (with MRG_RXBUF:
                           # a first buffer smaller than the header)
    QUEUE_IRQS   = 0x320   # used-buffer notifications sent (MSI-X, or ISR only without a vector)
    IRQ_SUPPRESSED = 0x324 # used buffers the driver asked not to be interrupted for
    XLATE_ERRORS = 0x328   # queue or buffer addresses outside the function's domain (or absent)
    CTRL         = 0x32C   # bit 0 DEFAULT_PF: an uplink frame for no function, and any frame
                           # for a stopped function (MigRegs.CTRL), goes to the PF
    CTRL_DEFAULT_PF = 1 << 0


class MgmtBlockRegs:
    """PF BAR2: the management block (hdl.mgmt_block), reached by the host through PF BAR2 and
    by the firmware through the management UART (:class:`UartProto`). 32-bit registers.

    Telemetry is per function: write ``TEL_SEL`` with a function index, then read the ``TEL_*``
    counters of that function (32-bit, wrapping). The QoS limiter is a token bucket per
    function on the virtio transmit path: ``QOS_RATE`` is in 1/256 byte per card clock
    (0 = unlimited), ``QOS_BURST`` in bytes; a function may start a frame while its bucket is
    not negative, and the frame's length is then taken from the bucket.

    Management tasks (``TASKS`` of them) each have one owner, the card or the host, held in
    ``OWNER + 4*t``; a write of any other value is refused (counted in ``OWNER_REFUSED``), so
    there is never a task with two owners or none. Requests for task *t* are pushed by the host
    into a FIFO of ``REQ_DEPTH`` entries (``REQ_PUSH + 4*t``, 31-bit words; a push into a full
    FIFO is refused and counted); a read of ``REQ_POP + 4*t`` by the task's owner (the UART is
    the card's side, PF BAR2 the host's) takes the oldest one and returns it with bit 31 set; it
    returns 0 when the FIFO is empty or the reader is not the owner (counted in ``POP_DENIED``).

    The mailbox has a FIFO of ``MBOX_DEPTH`` words each way: host to firmware (``H2C``) and
    firmware to host (``C2H``). The sending side writes the register to push a word; the
    receiving side reads it to pop one, which comes back with bit 31 set (0: the FIFO was
    empty), so mailbox words are 31-bit. A read by the sending side, or a write by the
    receiving side, does nothing.
    """
    BLOCK_ID   = 0x400   # RO: "MGMT"
    UTIL       = 0x404   # RO: utilisation inputs, percent: custom hw [7:0], processor [15:8],
                         #     memory [23:16], network [31:24]
    CYCLES_LO  = 0x408   # RO: card clock cycles since reset (read LO first: HI is latched)
    CYCLES_HI  = 0x40C
    TEL_SEL    = 0x410   # RW: function index of the TEL_* window
    TEL_TX_BYTES  = 0x414  # frame bytes taken from the function's transmit queue
    TEL_TX_FRAMES = 0x418
    TEL_RX_BYTES  = 0x41C  # frame bytes delivered into its receive queue
    TEL_RX_FRAMES = 0x420
    TEL_DMA_BUSY  = 0x424  # clock cycles its DMA descriptor queue was being served
    TEL_FAULTS    = 0x428  # I/O page faults it raised
    TEL_OCC       = 0x42C  # descriptors waiting in its DMA ring (producer - consumer)
    TEL_QOS_WAIT  = 0x430  # times a ready transmit queue was held back by its limiter
    QOS_SEL    = 0x440   # RW: function index of the QOS_* window
    QOS_RATE   = 0x444   # RW: 1/256 byte per clock, 16 bits; 0 = unlimited
    QOS_BURST  = 0x448   # RW: bucket depth in bytes, 15 bits
    QOS_TOKENS = 0x44C   # RO: the bucket now, signed, 1/256 byte
    MBOX_H2C   = 0x450   # host writes (PF BAR2), firmware reads (UART)
    MBOX_C2H   = 0x454   # firmware writes (UART), host reads (PF BAR2)
    MBOX_STAT  = 0x458   # RO: H2C words waiting [7:0], C2H words waiting [15:8],
                         #     words refused because the FIFO was full [31:16]
    OWNER_REFUSED = 0x45C  # RO: writes of an invalid owner value
    POP_DENIED = 0x460   # RO: REQ_POP reads by a side that does not own the task
    REQ_REFUSED = 0x464  # RO: REQ_PUSH writes into a full FIFO
    UART_FRAMES = 0x468  # RO: UART frames executed
    UART_ERRORS = 0x46C  # RO: UART frames refused (bad CRC, length, command, address; cut short)
    OWNER      = 0x480   # RW: task t at OWNER + 4*t: 1 card, 2 host
    REQ_PUSH   = 0x4A0   # WO: task t at REQ_PUSH + 4*t
    REQ_POP    = 0x4C0   # RO (pops): task t at REQ_POP + 4*t
    REQ_LEVEL  = 0x4E0   # RO: task t at REQ_LEVEL + 4*t: requests waiting
    TASKS = 4
    REQ_DEPTH = 16
    MBOX_DEPTH = 16
    BLOCK_ID_VALUE = 0x4D474D54   # "MGMT"
    LIMIT = 0x500        # end of the block's window


class Owner:
    CARD = 1
    HOST = 2


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


class UartProto:
    """The management UART's framed protocol (hdl.mgmt_uart), 8N1, LSB first.

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


class MigRegs:
    """PF BAR2: per-function quiesce and the virtio engine's device-internal queue state, for
    VF save / restore and live migration (hdl.virtio_net). Everything else a function needs to
    resume (features, status, queue sizes, vectors and addresses, the MSI-X table) the host
    reads and replays through the function's own registers.

    ``MIG_CTRL`` bit 0 stops the selected function: the engine starts no transmit for it and
    delivers no frame into its receive queue (such a frame is dropped and counted in
    ``DROP_NOBUF``, or goes to the PF when ``NetRegs.CTRL`` DEFAULT_PF is set); what was under
    way finishes. ``MIG_STATUS``: bit 0 stopped, bit 1 idle
    (stopped, and nothing of the function is in the engine). The index registers are the
    device's ``last_avail`` and ``used`` indices of receiveq1 / transmitq1 and the pending
    transmit notification; they are written only while the function is idle (else ignored).

    ``MAC_LO`` / ``MAC_HI`` are the selected function's unicast address in the switch
    (:mod:`hdl.mac_table`): bytes 0..3 and 4..5, first byte lowest; writable at any time. A
    multicast address retires the entry (no frame is delivered to it by address).
    """
    SEL = 0x340
    CTRL = 0x344
    STATUS = 0x348
    RX_AVAIL = 0x350
    RX_USED = 0x354
    TX_AVAIL = 0x358
    TX_USED = 0x35C
    TX_PEND = 0x360
    MAC_LO = 0x364
    MAC_HI = 0x368


class VirtioCaps:
    """Vendor-specific (virtio) PCI capabilities, the same on the PF and on every VF."""
    COMMON = 0xA0
    NOTIFY = 0xB0
    ISR = 0xC4
    DEVICE = 0xD4
    CFG_TYPE_COMMON = 1
    CFG_TYPE_NOTIFY = 2
    CFG_TYPE_ISR = 3
    CFG_TYPE_DEVICE = 4


class FuncRegs:
    """Per-function register file at BAR0 + 0x0000 (byte offsets)."""
    ID       = 0x00   # RO: 0xC0DE << 16 | is_vf << 15 | function index
    VERSION  = 0x04   # RO: design version
    SCRATCH  = 0x08   # RW: one word per function
    IRQ      = 0x0C   # WO: writing N requests MSI-X vector N of this function
    ID_MAGIC = 0xC0DE
    VERSION_VALUE = 0x0001_0000


class DmaRegs:
    """Per-function DMA queue registers at BAR0 + 0x100 (byte offsets); see hdl.dma_queue."""
    BASE      = 0x100
    RING_LO   = 0x100   # RW: ring base, 32-byte aligned
    RING_HI   = 0x104   # RW
    RING_LOG2 = 0x108   # RW: ring entries = 1 << value (0..8)
    CTRL      = 0x10C   # RW: bit 0 enable (0 also resets the indices), [12:8] MSI-X vector
    PROD      = 0x110   # RW: producer index, the doorbell
    CONS      = 0x114   # RO: consumer index (descriptors finished)
    STATUS    = 0x118   # RO: bit 1 error (a descriptor fetch failed; cleared by disabling)
    DESC_SIZE = 32


class DescStatus:
    """The status word the card writes into a finished DMA descriptor (see hdl.dma_queue)."""
    DONE = 0x0000_0001
    BAD_DESC = 0x8000_0001      # length, card range or byte lanes invalid
    CPL_ERROR = 0x8000_0002     # the host answered UR / CA (or timed out)
    FAULT = 0x8000_0003         # a page was not present and the host refused (or no fault queues)
    BLOCKED = 0x8000_0004       # an IOVA outside the function's domain: nothing was moved


class MgmtRegs:
    """PF BAR2 card registers (byte offsets)."""
    CARD_ID        = 0x00   # RO: "OFFC"
    CARD_CONFIG    = 0x04   # RO: total_vfs [15:0], data width/32 [23:16], msix vectors [31:24]
    ERR_MALFORMED  = 0x10   # RO: malformed TLPs dropped (or answered UR)
    ERR_UNSUPPORTED = 0x14  # RO: requests answered with UR, posted requests that hit nothing
    ERR_CA         = 0x18   # RO: requests answered with Completer Abort
    ERR_UNEXP_CPL  = 0x1C   # RO: completions that matched no outstanding request
    ERR_POISONED   = 0x20   # RO: poisoned requests received
    RX_TLPS        = 0x24   # RO: TLPs received
    TX_TLPS        = 0x28   # RO: TLPs sent
    CARD_ID_VALUE  = 0x4F464643  # "OFFC"
    SIZE = 0x1000


PAGE_SHIFT = 12          # translation granule: 4 KiB
PTE_PRESENT = 1 << 0     # page-table entry bit 0; bits [63:12] are the page's bus address


class IommuRegs:
    """PF BAR2: the per-function translation domains and the device TLB (hdl.translate).

    A domain is a flat table of little-endian u64 page-table entries in host memory, one per
    4 KiB page of the function's I/O virtual address space: entry *n* maps IOVA
    ``n << 12`` .. ``(n << 12) + 0xFFF``; bit 0 present, bits [63:12] the bus address.
    Only the PF's driver (BAR2 is PF-only) can change a domain, never the function itself.
    """
    DOM_SEL   = 0x100   # RW: function index the DOM_* registers below address
    DOM_PT_LO = 0x104   # RW: page table base [31:12] (4 KiB aligned)
    DOM_PT_HI = 0x108   # RW: page table base [63:32]
    DOM_PAGES = 0x10C   # RW: pages in the domain (IOVA below pages << 12); 0 = no translation
    DOM_VM    = 0x110   # RW: VM id [7:0], reported in I/O page fault entries
    ATC_INV   = 0x114   # WO: drop the device-TLB entries of function [7:0] (bit 31: of all)
    ATC_HITS  = 0x118   # RO: translations served by the device TLB
    ATC_MISSES = 0x11C  # RO: page-table walks
    BLOCKED   = 0x120   # RO: DMA segments refused because the IOVA is outside the domain
    MAX_PAGES = 1 << 20  # DOM_PAGES is clamped to this: 4 GiB of IOVA per function


class FaultRegs:
    """PF BAR2: the I/O page fault queues (hdl.fault). Rings of 16-byte entries in host memory;
    entries = 1 << LOG2 (0..8). The card produces FBQ and IOPF entries, the host produces CQ
    entries.

    FBQ entry:  u32 staging buffer (card address), u32 length, u16 function, u16 slot, u32 0
    IOPF entry: u64 faulting IOVA, u8 function, u8 VM, u8 flags (bit 0 write, bit 1 has an FBQ
                entry), u8 0, u16 FBQ index (0xFFFF: none), u16 sequence (IOPF index + 1)
    CQ entry:   u8 function, u8 status (0 page mapped: retry, 1 refused), u16 0,
                u32 IOPF index, u64 0
    """
    FBQ_LO    = 0x200
    FBQ_HI    = 0x204
    FBQ_LOG2  = 0x208
    IOPF_LO   = 0x20C
    IOPF_HI   = 0x210
    IOPF_LOG2 = 0x214
    CQ_LO     = 0x218
    CQ_HI     = 0x21C
    CQ_LOG2   = 0x220
    CTRL      = 0x224   # RW: bit 0 enable (0 also resets every index), [12:8] PF MSI-X vector
    FBQ_PROD  = 0x228   # RO: FBQ entries written by the card
    FBQ_CONS  = 0x22C   # RW: FBQ entries the host has read
    IOPF_PROD = 0x230   # RO
    IOPF_CONS = 0x234   # RW
    CQ_PROD   = 0x238   # RW: the doorbell: CQ entries the host has written
    CQ_CONS   = 0x23C   # RO: CQ entries the card has taken
    FAULTS    = 0x240   # RO: faults raised
    STAGE_BUSY = 0x244  # RO: bit n set while staging slot n holds a payload
    CQ_BAD    = 0x248   # RO: CQ entries ignored (no open fault for the function)
    ENTRY_SIZE = 16
    ST_MAPPED = 0
    ST_REFUSED = 1
    FLAG_WRITE = 1 << 0
    FLAG_FBQ = 1 << 1
    NO_FBQ = 0xFFFF


class Staging:
    """Staging buffers for payloads whose page is not present: card addresses above the 64 KiB
    that descriptors can name. A payload keeps its byte lane: it is staged at
    ``BASE + slot * STRIDE + (card address mod 32)``."""
    BASE = 0x10000
    STRIDE = 0x1040
    SLOTS = 4
    TOP = BASE + SLOTS * STRIDE


@dataclass(frozen=True)
class CardConfig:
    """Everything that changes the elaborated card.

    ``total_vfs``   -- SR-IOV TotalVFs (InitialVFs is the same). VF *n* (1-based) sits at routing
                       ID function number *n* (First VF Offset 1, VF Stride 1, with ARI).
    ``data_width``  -- TLP stream data width in bits: 64, 128 or 256.
    ``msix_vectors``-- MSI-X vectors per function (PF and VFs alike).
    """
    total_vfs: int = 16
    data_width: int = 64
    msix_vectors: int = 4
    vendor_id: int = 0x1AF4          # virtio
    device_id: int = 0x1041          # virtio-net, modern transport
    vf_device_id: int = 0x1041
    subsystem_vendor_id: int = 0x1AF4
    subsystem_id: int = 0x0001
    revision_id: int = 0x01
    class_code: int = 0x020000       # Ethernet controller
    bar0_size: int = Bar0Map.SIZE    # 64-bit prefetchable, PF
    bar2_size: int = MgmtRegs.SIZE   # 32-bit non-prefetchable, PF only
    vf_bar0_size: int = Bar0Map.SIZE # 64-bit prefetchable, per VF
    max_mmio_dw: int = 16            # longest MMIO read/write the completer serves
    uart_divisor: int = 8            # card clocks per management-UART bit (1085: 115200 Bd at
                                     # 125 MHz; the simulations use 8 to stay fast)

    def __post_init__(self):
        def pow2(x):
            return x > 0 and x & (x - 1) == 0
        if not (1 <= self.total_vfs <= 255):
            raise ValueError(f"total_vfs must be 1..255 (ARI function numbers), got {self.total_vfs}")
        if self.data_width not in (64, 128, 256):
            raise ValueError(f"data_width must be 64, 128 or 256, got {self.data_width}")
        if not (1 <= self.msix_vectors <= 32) or not pow2(self.msix_vectors):
            raise ValueError(f"msix_vectors must be a power of two in 1..32, got {self.msix_vectors}")
        for name in ("bar0_size", "bar2_size", "vf_bar0_size"):
            v = getattr(self, name)
            if not pow2(v) or v < 0x1000:
                raise ValueError(f"{name} must be a power of two >= 4096, got {v}")
        if self.bar0_size < Bar0Map.SIZE or self.vf_bar0_size < Bar0Map.SIZE:
            raise ValueError("BAR0 sizes must hold the BAR0 map (16 KiB)")
        if not (4 <= self.uart_divisor <= 65535):
            raise ValueError(f"uart_divisor must be 4..65535 clocks per bit, got {self.uart_divisor}")
        if not pow2(self.max_mmio_dw):
            raise ValueError("max_mmio_dw must be a power of two")

    @property
    def num_functions(self):
        return 1 + self.total_vfs

    def as_dict(self):
        return asdict(self)
