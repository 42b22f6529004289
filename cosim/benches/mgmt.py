"""The management block through its two doors: the UART (bit level on the card's pins, framed
protocol) and PF BAR2 through cocotbext-pcie's RootComplex. Telemetry against real traffic,
QoS limits measured on the uplink, and the protocol's error handling."""

import struct

import cocotb
from cocotb.triggers import ClockCycles

from hdl.params import CardConfig, MgmtBlockRegs as R, MgmtRegs, UartProto as P, Owner
from firmware.protocol import (encode_request, read_request, write_request, ping_request,
                               parse_reply)
from cosim.harness import CardHarness
from cosim.uart_bridge import UartPhy

DIVISOR = CardConfig().uart_divisor
READ_REPLY = 10         # 0x5A LEN CMD SEQ STATUS DATA*4 CRC
STATUS_REPLY = 6        # 0x5A LEN CMD SEQ STATUS CRC


async def start(dut, num_vfs=0):
    h = CardHarness(dut)
    await h.start()
    await h.drv.probe()
    vfs = await h.drv.enable_sriov(num_vfs) if num_vfs else []
    phy = UartPhy(dut, DIVISOR)
    return h, phy, vfs


async def uread(phy, addr, seq=1):
    r = parse_reply(await phy.transact(read_request(seq, addr), READ_REPLY))
    assert not r.error and r.status == P.OK and r.seq == seq, r
    return r.value


async def uwrite(phy, addr, value, seq=2):
    r = parse_reply(await phy.transact(write_request(seq, addr, value), STATUS_REPLY))
    assert not r.error and r.status == P.OK and r.seq == seq, r


def set_util(dut, custom_hw=0, processor=0, memory=0, network=0):
    dut.util.value = custom_hw | processor << 8 | memory << 16 | network << 24


@cocotb.test()
async def test_uart_protocol(dut):
    """PING, READ and WRITE over the UART reach PF BAR2 (the same registers the host sees);
    bad CRC, a cut-short frame, an unknown command, bad lengths and bad addresses each get an
    error reply naming the fault and leave the card unchanged."""
    h, phy, _ = await start(dut)
    r = parse_reply(await phy.transact(ping_request(7), READ_REPLY))
    assert r.status == P.OK and r.seq == 7 and r.cmd == P.PING and r.value == MgmtRegs.CARD_ID_VALUE
    assert await uread(phy, R.BLOCK_ID) == R.BLOCK_ID_VALUE
    set_util(dut, 11, 22, 33, 44)
    await ClockCycles(dut.clk, 4)
    assert await uread(phy, R.UTIL) == 11 | 22 << 8 | 33 << 16 | 44 << 24
    # a write over the UART is seen by the host, and the other way round
    await uwrite(phy, R.QOS_SEL, 3)
    await uwrite(phy, R.QOS_RATE, 0x180)
    await h.drv.mgmt_write(R.QOS_SEL, 3)
    assert await h.drv.mgmt_read(R.QOS_RATE) == 0x180
    await h.drv.mgmt_write(R.QOS_BURST, 1234)
    assert await uread(phy, R.QOS_BURST) == 1234
    assert await uread(phy, R.TEL_SEL) == 0

    async def refused(frame, status, reply_len=STATUS_REPLY):
        r = parse_reply(await phy.transact(frame, reply_len,
                                           timeout_cycles=(P.GAP_BITS + 200) * 10 * DIVISOR))
        assert r.error and r.status == status, (frame.hex(), r)
        return r

    errors0 = await uread(phy, R.UART_ERRORS)
    bad = bytearray(write_request(9, R.QOS_RATE, 0x7777))
    bad[-1] ^= 0x5A
    r = await refused(bytes(bad), P.BAD_CRC)
    assert r.seq == 9
    await refused(write_request(10, R.QOS_RATE, 0x7777)[:6], P.TRUNCATED)
    await refused(encode_request(0x42, 11, b""), P.UNKNOWN_CMD)
    await refused(encode_request(P.READ, 12, b"\x00\x04\x00"), P.BAD_LEN)
    await refused(encode_request(P.WRITE, 13, bytes(7)), P.BAD_LEN)
    await refused(write_request(14, R.QOS_RATE + 2, 0x7777), P.BAD_ADDR)
    await refused(read_request(15, CardConfig().bar2_size), P.BAD_ADDR)
    # garbage before a frame is skipped
    r = parse_reply(await phy.transact(b"\x00\x13\xff" + read_request(16, R.QOS_RATE), READ_REPLY))
    assert r.status == P.OK and r.value == 0x180, r
    assert await h.drv.mgmt_read(R.QOS_RATE) == 0x180, "a refused frame changed the card"
    assert await uread(phy, R.UART_ERRORS) == errors0 + 7
    assert await h.drv.mgmt_read(R.UART_FRAMES) > 8


@cocotb.test()
async def test_owner_and_requests(dut):
    """Task owners and request FIFOs: the host pushes, only the owner's side pops (UART = card,
    BAR2 = host), an owner flip is one write; invalid owners are refused; the mailbox carries
    words both ways."""
    h, phy, _ = await start(dut)
    for t in range(R.TASKS):
        assert await h.drv.mgmt_read(R.OWNER + 4 * t) == Owner.CARD
    pushed = list(range(100, 120))
    served = []
    for i, w in enumerate(pushed[:10]):
        await h.drv.mgmt_write(R.REQ_PUSH + 4, w)
    assert await uread(phy, R.REQ_LEVEL + 4) == 10
    assert await h.drv.mgmt_read(R.REQ_POP + 4) == 0          # the host does not own task 1
    for _ in range(4):
        v = await uread(phy, R.REQ_POP + 4)
        assert v >> 31, hex(v)
        served.append(v & 0x7FFF_FFFF)
    await uwrite(phy, R.OWNER + 4, Owner.HOST)
    assert await uread(phy, R.REQ_POP + 4) == 0               # the card no longer does
    for w in pushed[10:]:
        await h.drv.mgmt_write(R.REQ_PUSH + 4, w)
    while True:
        v = await h.drv.mgmt_read(R.REQ_POP + 4)
        if not v >> 31:
            break
        served.append(v & 0x7FFF_FFFF)
    assert served == pushed, served
    assert await h.drv.mgmt_read(R.POP_DENIED) == 2
    await uwrite(phy, R.OWNER + 4, 0)
    await uwrite(phy, R.OWNER + 4, 3)
    assert await h.drv.mgmt_read(R.OWNER + 4) == Owner.HOST
    assert await h.drv.mgmt_read(R.OWNER_REFUSED) == 2
    # mailbox both ways
    await uwrite(phy, R.MBOX_C2H, 0x0101_0002)
    await h.drv.mgmt_write(R.MBOX_H2C, 0x1101_0000)
    assert await h.drv.mgmt_read(R.MBOX_STAT) & 0xFFFF == 0x0101
    assert await h.drv.mgmt_read(R.MBOX_C2H) == 0x8101_0002
    assert await h.drv.mgmt_read(R.MBOX_C2H) == 0
    assert await uread(phy, R.MBOX_H2C) == 0x9101_0000
    assert await uread(phy, R.MBOX_H2C) == 0
