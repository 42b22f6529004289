"""BAR0 of every function (the PF and each VF alike): the map and its register files.

Byte offsets. The windows these registers sit in, and the check that no two overlap, are in
:mod:`regmap.windows`.
"""

__all__ = ["Bar0Map", "FuncRegs", "DmaRegs", "VirtioRegs"]


class Bar0Map:
    """Layout of BAR0 of every function (PF and VF alike), byte offsets."""
    FUNC_REGS = 0x0000   # hdl.pcie.func_regs
    VIRTIO    = 0x1000   # reserved for the virtio-pci structures
    MSIX_TABLE = 0x2000  # 16 bytes per vector
    MSIX_PBA  = 0x3000   # one bit per vector
    SIZE      = 0x4000


class FuncRegs:
    """Per-function register file at BAR0 + 0x0000 (byte offsets)."""
    ID       = 0x00   # RO: 0xC0DE << 16 | is_vf << 15 | function index
    VERSION  = 0x04   # RO: design version
    SCRATCH  = 0x08   # RW: one word per function
    IRQ      = 0x0C   # WO: writing N requests MSI-X vector N of this function
    ID_MAGIC = 0xC0DE
    VERSION_VALUE = 0x0001_0000


class DmaRegs:
    """Per-function DMA queue registers at BAR0 + 0x100 (byte offsets); see hdl.dma.queue."""
    BASE      = 0x100
    RING_LO   = 0x100   # RW: ring base, 32-byte aligned
    RING_HI   = 0x104   # RW
    RING_LOG2 = 0x108   # RW: ring entries = 1 << value (0..8)
    CTRL      = 0x10C   # RW: bit 0 enable (0 also resets the indices), [12:8] MSI-X vector
    PROD      = 0x110   # RW: producer index, the doorbell
    CONS      = 0x114   # RO: consumer index (descriptors finished)
    STATUS    = 0x118   # RO: bit 1 error (a descriptor fetch failed; cleared by disabling)
    DESC_SIZE = 32


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
    F_NET_CSUM = 0           # the device fills in a transmitted frame's partial checksum
    F_NET_GUEST_CSUM = 1     # the device checks received TCP / UDP checksums (DATA_VALID)
    F_NET_MAC = 5
    F_NET_MRG_RXBUF = 15
    F_NET_STATUS = 16
    F_NET_CTRL_VQ = 17       # a control queue (commands: VIRTIO_NET_CTRL_MQ only)
    F_NET_MQ = 22            # up to MAX_PAIRS queue pairs, automatic receive steering
    F_RING_INDIRECT_DESC = 28
    F_RING_EVENT_IDX = 29
    F_VERSION_1 = 32
    FEATURES = ((1 << F_NET_CSUM) | (1 << F_NET_GUEST_CSUM) | (1 << F_NET_MAC) | (1 << F_NET_MRG_RXBUF) | (1 << F_NET_STATUS)
                | (1 << F_NET_CTRL_VQ) | (1 << F_NET_MQ)
                | (1 << F_RING_INDIRECT_DESC) | (1 << F_RING_EVENT_IDX) | (1 << F_VERSION_1))
    MAX_PAIRS = 4            # queue pairs a function has (max_virtqueue_pairs)
    # queues: receiveq(k) = 2k, transmitq(k) = 2k + 1, then the control queue: at 2 *
    # MAX_PAIRS when MQ is negotiated, else at 2 (virtio 1.2, 5.1.2)
    NUM_QUEUES_VALUE = 2 * MAX_PAIRS + 1
    QUEUE_SIZE_MAX = 256
    # virtio_net_config
    NET_MAC = 0x00           # 6 bytes: 02:0f:fc:00:00:<function index>
    NET_STATUS = 0x06        # u16: bit 0 link up
    NET_MAX_PAIRS = 0x08     # u16: MAX_PAIRS
    # the control queue's commands (virtio 1.2, 5.1.6.5): class, command, data, then a
    # device-writable ack byte
    CTRL_MQ = 4
    CTRL_MQ_VQ_PAIRS_SET = 0
    CTRL_OK, CTRL_ERR = 0, 1
    MAC_PREFIX = bytes([0x02, 0x0F, 0xFC, 0x00, 0x00])
