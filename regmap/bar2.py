"""PF BAR2: the card's own registers, reachable by the PF's driver only (and by the firmware
through the management UART, :mod:`regmap.protocol`). Byte offsets.

A VF cannot reach any of this: it is how the host owns the translation domains, the fault
queues, the switch, the migration controls and the management block.
"""

__all__ = ["MgmtRegs", "IommuRegs", "FaultRegs", "NetRegs", "MigRegs", "MgmtBlockRegs",
           "DirtyLogRegs", "Owner"]


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


class IommuRegs:
    """PF BAR2: the per-function translation domains and the device TLB (hdl.iommu.translate).

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
    """PF BAR2: the I/O page fault queues (hdl.iommu.fault). Rings of 16-byte entries in host memory;
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


class NetRegs:
    """PF BAR2: the virtio-net switch's counters (hdl.virtio.net), 32-bit, wrapping."""
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
    CSUM_FILLED  = 0x330   # transmitted frames whose partial checksum the card filled in
    CSUM_VALID   = 0x334   # frames delivered with DATA_VALID (their TCP / UDP checksum held)
    CSUM_BAD     = 0x338   # TCP / UDP frames checked for a receiver whose checksum was wrong
    DROP_CSUM    = 0x33C   # NEEDS_CSUM with csum_start + csum_offset outside the frame
    COAL         = 0x370   # bits 7:0: used elements a queue may hold back before it publishes
                           # them (and interrupts); 0 or 1: each frame at once. Bits 31:16:
                           # clocks the oldest held-back one may wait. Held back elements are
                           # also published once the engine has nothing else to do, and a
                           # transmit queue's last known entry at once.
    COAL_RESET = 8 | 1024 << 16
    COAL_Q       = 0x374   # + 4 * q: queue q of the function MigRegs.SEL selects (2k
                           # receiveq(k), 2k + 1 transmitq(k), then the control queue,
                           # VirtioRegs.NUM_QUEUES_VALUE in all): bits 7:0 and 31:16 as in COAL, bit 8 OWN: the
                           # queue uses these rather than COAL. Cleared by the card's reset
                           # only: they are the PF's policy for the queue, not the function's
                           # state.
    COAL_Q_OWN = 1 << 8


class MigRegs:
    """PF BAR2: per-function quiesce and the virtio engine's device-internal queue state, for
    VF save / restore and live migration (hdl.virtio.net). Everything else a function needs to
    resume (features, status, queue sizes, vectors and addresses, the MSI-X table) the host
    reads and replays through the function's own registers.

    ``MIG_CTRL`` bit 0 stops the selected function: the engine starts no transmit for it and
    delivers no frame into its receive queue (such a frame is dropped and counted in
    ``DROP_NOBUF``, or goes to the PF when ``NetRegs.CTRL`` DEFAULT_PF is set); what was under
    way finishes. ``MIG_STATUS``: bit 0 stopped, bit 1 idle
    (stopped, and nothing of the function is in the engine). ``Q_AVAIL`` / ``Q_USED`` are the
    device's ``last_avail`` and ``used`` indices of queue ``Q_SEL`` (a virtio queue index) of
    the selected function (a value that names no queue reads back all ones, its indices 0), ``TX_PEND`` its pending transmit notifications (bit 0: any; a
    restore of 1 marks every transmit queue and the control queue as notified, which costs
    at most a look at their rings); they are written only while the function is idle (else
    ignored).

    ``MAC_LO`` / ``MAC_HI`` are the selected function's unicast address in the switch
    (:mod:`hdl.virtio.mac_table`): bytes 0..3 and 4..5, first byte lowest; writable at any time. A
    multicast address retires the entry (no frame is delivered to it by address).
    """
    SEL = 0x340
    CTRL = 0x344
    STATUS = 0x348
    Q_SEL = 0x34C
    Q_AVAIL = 0x350
    Q_USED = 0x354
    TX_PEND = 0x360
    MAC_LO = 0x364
    MAC_HI = 0x368


class MgmtBlockRegs:
    """PF BAR2: the management block (hdl.mgmt.block), reached by the host through PF BAR2 and
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


class DirtyLogRegs:
    """PF BAR2: dirty-page logging per function (hdl.dma.dirty_log), for live migration.

    While a function's log is on, every memory write the card sends on that function's behalf
    (DMA, used rings, received frames, fault records: every MemWr with its requester ID, except
    MSI-X messages) marks the 4 KiB page it writes in a bitmap in host memory: bit ``i`` stands
    for the page at ``FIRST + i * 4096``, bits in byte order, bit 0 of a byte first (the layout
    of a vhost log). The card marks by writing the byte ``0xFF`` that holds the page's bit, as a
    posted one-byte MemWr with the PF's requester ID, sent after the write it logs: the page and
    up to seven of its neighbours read as dirty, and because the card never reads the bitmap, a
    host that clears it with an atomic exchange at any time misses nothing. A write outside
    ``FIRST .. FIRST + PAGES * 4096`` sets the function's OVERFLOW bit (the host then treats all
    of its memory as dirty).

    ``SEL`` picks the function for ``CTRL``, ``BASE_*``, ``FIRST_*`` and ``PAGES``. ``CTRL``
    bit 0 turns the log on (set it after the other registers); bit 1 reads OVERFLOW, writing 1
    to it clears it. ``MARKS`` counts the marking writes sent (card-wide).
    """
    SEL = 0x500
    CTRL = 0x504
    BASE_LO = 0x508      # bus address of the bitmap
    BASE_HI = 0x50C
    FIRST_LO = 0x510     # bus address bit 0 stands for (4 KiB aligned)
    FIRST_HI = 0x514
    PAGES = 0x518        # pages the bitmap covers
    MARKS = 0x51C        # RO
    CTRL_ON = 1 << 0
    CTRL_OVERFLOW = 1 << 1
    PAGE_SHIFT = 12


class Owner:
    CARD = 1
    HOST = 2
