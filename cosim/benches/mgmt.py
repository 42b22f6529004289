"""The management block through its two doors: the UART (bit level on the card's pins, framed
protocol) and PF BAR2 through cocotbext-pcie's RootComplex. Telemetry against real traffic,
QoS limits measured on the uplink, and the protocol's error handling."""

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import cocotb
from cocotb.triggers import ClockCycles

from hdl.config import CardConfig
from regmap import MgmtBlockRegs as R, MgmtRegs, UartProto as P, Owner
from firmware.link import UartLink
from firmware.protocol import (encode_request, read_request, write_request, ping_request,
                               parse_reply)
from cosim.harness import CardHarness, CLOCK_NS
from cosim.uart_bridge import UartBridge, UartPhy
from cosim.uplink import Uplink
from cosim.scenarios.mgmt import FirmwareThread, HostSide, THRESHOLD, write_policy
from cosim.scenarios.virtio import net, frame, receive_n, diff
from host_driver.dma import DmaQueue

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


def bench_record(key, rows):
    """Add ``rows`` under ``key`` to the JSON report named by ``OFFCARD_BENCH_OUT`` (make bench)."""
    out = os.environ.get("OFFCARD_BENCH_OUT")
    if out:
        path = Path(out)
        rec = json.loads(path.read_text()) if path.exists() else {}
        rec[key] = rows
        path.write_text(json.dumps(rec))


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


# ---- telemetry and QoS against real traffic ------------------------------------------------

UPLINK_MAC = bytes.fromhex("02aabbccdd01")       # not one of the card's: goes to the uplink


async def tel(h, fidx):
    await h.drv.mgmt_write(R.TEL_SEL, fidx)
    regs = ("TX_BYTES", "TX_FRAMES", "RX_BYTES", "RX_FRAMES", "DMA_BUSY", "FAULTS", "OCC",
            "QOS_WAIT")
    return {n.lower(): await h.drv.mgmt_read(getattr(R, "TEL_" + n)) for n in regs}


async def stream_frames(nic, frames):
    for f in frames:
        await nic.send(f)
        await nic.reap_tx()


async def uplink_wait(dut, up, src_mac, count, timeout_cycles=400_000):
    """Wait until ``count`` frames from ``src_mac`` have left on the uplink."""
    for _ in range(timeout_cycles // 500):
        if sum(f[6:12] == src_mac for f in up.received) >= count:
            return
        await ClockCycles(dut.clk, 500)
    raise AssertionError(f"fewer than {count} frames from {src_mac.hex()} on the uplink")


def uplink_rate(up, src_mac, skip, since_ns=0):
    """Frame bytes per clock of the frames from ``src_mac`` on the uplink, after the first
    ``skip`` (the bucket's initial burst), from the last skipped frame's departure on."""
    mine = [(t, len(f)) for f, t in zip(up.received, up.times_ns)
            if f[6:12] == src_mac and t >= since_ns]
    assert len(mine) > skip + 4, f"only {len(mine)} frames from {src_mac.hex()}"
    t0 = mine[skip][0]
    t1 = mine[-1][0]
    return sum(n for _, n in mine[skip + 1:]) * CLOCK_NS / (t1 - t0)


@cocotb.test()
async def test_telemetry_and_qos(dut):
    """Per-function telemetry counts exactly what the traffic did (frames and bytes each way,
    DMA busy cycles, ring occupancy); a function limited by its token bucket sends within 5 %
    of its rate on the uplink while an unlimited one is never held back."""
    h, phy, vfs = await start(dut, 3)
    up = Uplink(dut, h.data_width)
    rnd = random.Random(5)
    a, b, c = [await net(h, vf) for vf in vfs]
    await c.post_rx(16)
    # VF1 -> VF3: frames and bytes on both sides
    sizes = [60, 200, 1000, 1514]
    sent = [frame(c.mac, a.mac, n, rnd) for n in sizes]
    await stream_frames(a, sent)
    assert await receive_n(c, len(sent)) == sent
    ta, tc = await tel(h, 1), await tel(h, 3)
    assert (ta["tx_frames"], ta["tx_bytes"]) == (4, sum(sizes)), ta
    assert (tc["rx_frames"], tc["rx_bytes"]) == (4, sum(sizes)), tc
    assert ta["rx_frames"] == 0 and tc["tx_frames"] == 0
    # the PF's DMA ring: busy cycles, and occupancy while the queue is disabled
    pf = h.drv.pf
    q = await DmaQueue(pf, entries=16).setup()
    buf = (h.t.alloc_host_mem(0x4000) + 0xFFF) & ~0xFFF
    await q.transfer(buf, 0, 4096, to_host=False)
    t0 = await tel(h, 0)
    assert t0["dma_busy"] > 4096 // (h.data_width // 8), t0
    assert t0["occ"] == 0 and t0["faults"] == 0

    # QoS: VF1 limited, VF2 unlimited, both streaming 512-byte frames to the uplink
    size, n = 512, 24
    rate = 0.5                                           # bytes per clock
    solo = [frame(UPLINK_MAC, b.mac, size, rnd) for _ in range(n)]
    t_solo = h.t.now_ns()
    await stream_frames(b, solo)
    await uplink_wait(dut, up, b.mac, n)
    solo_rate = uplink_rate(up, b.mac, 2, t_solo)
    await uwrite(phy, R.QOS_SEL, 1)
    await uwrite(phy, R.QOS_BURST, 1024)
    await uwrite(phy, R.QOS_RATE, int(rate * 256))
    t_both = h.t.now_ns()
    fa = [frame(UPLINK_MAC, a.mac, size, rnd) for _ in range(n)]
    fb = [frame(UPLINK_MAC, b.mac, size, rnd) for _ in range(n)]
    ja = cocotb.start_soon(stream_frames(a, fa))
    jb = cocotb.start_soon(stream_frames(b, fb))
    await ja
    await jb
    await uplink_wait(dut, up, a.mac, n)
    await uplink_wait(dut, up, b.mac, 2 * n)
    lim_rate = uplink_rate(up, a.mac, 4, t_both)
    got_b = [f for f in up.received if f[6:12] == b.mac][n:]
    assert got_b == fb, diff(got_b, fb)
    t1, t2 = await tel(h, 1), await tel(h, 2)
    dut._log.info("QoS: solo unlimited %.3f B/clk; limited to %.3f: measured %.3f B/clk; "
                  "held back %d times (VF2 %d)", solo_rate, rate, lim_rate, t1["qos_wait"],
                  t2["qos_wait"])
    assert solo_rate > 1.5 * rate, "the offered load does not exceed the limit: no test"
    assert abs(lim_rate - rate) / rate < 0.05, (lim_rate, rate)
    assert t1["qos_wait"] > 0 and t2["qos_wait"] == 0, (t1, t2)
    # the unlimited function kept sending while the limited one waited
    b_rate = uplink_rate(up, b.mac, 2, t_both)
    left = solo_rate - lim_rate                          # what the limited one leaves it
    dut._log.info("QoS: unlimited VF2 beside it: %.3f B/clk, %.1f %% of the %.3f left to it",
                  b_rate, 100 * b_rate / left, left)
    assert b_rate > 0.9 * (solo_rate - lim_rate), (b_rate, solo_rate, lim_rate)
    bench_record("qos", [{"frame_bytes": size, "limit_bytes_per_clk": rate,
                          "limited_bytes_per_clk": round(lim_rate, 4),
                          "error_pct": round(100 * (lim_rate - rate) / rate, 2),
                          "unlimited_alone_bytes_per_clk": round(solo_rate, 4),
                          "unlimited_beside_bytes_per_clk": round(b_rate, 4),
                          "isolation_pct": round(100 * b_rate / left, 1)}])


# ---- the firmware in the loop ----------------------------------------------------------------

RESOURCES = ("custom_hw", "processor", "memory", "network")


def card_served(log_path):
    out = []
    for line in Path(log_path).read_text().splitlines():
        ev = json.loads(line)
        if ev["event"] == "request_served":
            out.append(ev["req"])
    return out


async def owner_of(h, task=0):
    return await h.drv.mgmt_read(R.OWNER + 4 * task)


async def wait_owner(h, want, timeout_us, task=0, step_cycles=1000, alive=None):
    """Wait for ``task``'s owner register to read ``want``; ``alive`` (if given) is called at
    every step and raises when the process that should make it happen died."""
    t0 = h.t.now_ns()
    while h.t.now_ns() - t0 < timeout_us * 1000:
        if alive is not None:
            alive()
        if await owner_of(h, task) == want:
            return (h.t.now_ns() - t0) / 1000
        await ClockCycles(h.dut.clk, step_cycles)
    raise AssertionError(f"task {task} not owned by {want} after {timeout_us} us")


async def settle_requests(h, host, timeout_us=2000, alive=None):
    """Stop posting, then wait until every posted request completed."""
    host.post_every = None
    t0 = h.t.now_ns()
    while len(host.completed) < len(host.posted):
        if alive is not None:
            alive()
        assert h.t.now_ns() - t0 < timeout_us * 1000, \
            f"{len(host.posted) - len(host.completed)} requests never completed"
        await ClockCycles(h.dut.clk, 1000)


def check_exactly_once(host, log_path):
    by_card = card_served(log_path)
    by_host = host.host_served()
    served = by_card + by_host
    dup = {w for w in served if served.count(w) > 1}
    lost = set(host.posted) - set(served)
    assert not dup, f"served twice: {sorted(dup)[:8]}"
    assert not lost, f"never served: {sorted(lost)[:8]}"
    assert sorted(host.completed) == sorted(host.posted)
    return len(by_card), len(by_host)


@cocotb.test()
async def test_firmware_placement(dut):
    """The firmware (over pyserial on a socket to the simulated UART) keeps the management VM
    on the card while every resource is at or below its threshold, moves it to the host when
    any one of the four alone goes above, and back after the dwell time; user-VM requests
    arrive all the while through the vhost back-end and each is served exactly once, by the
    card or by the host VM."""
    h, phy, _ = await start(dut)
    bridge = UartBridge(phy, "tcp")
    folder = tempfile.mkdtemp(prefix="offcard-fw-")
    policy = write_policy(folder)
    host = HostSide(h)
    host_job = cocotb.start_soon(host.run())
    fw = FirmwareThread(bridge.url, policy)
    latencies = []
    try:
        for r in RESOURCES:
            set_util(dut, **{r: THRESHOLD})                # equal: stays on the card
            await ClockCycles(dut.clk, 12_000)
            assert await owner_of(h) == Owner.CARD, f"{r} at its threshold moved the VM"
            rt0 = fw.link.round_trips
            set_util(dut, **{r: THRESHOLD + 1})
            us = await wait_owner(h, Owner.HOST, 3000)
            latencies.append((us, fw.link.round_trips - rt0))
            set_util(dut)
            back = await wait_owner(h, Owner.CARD, 3000)
            assert back >= 30, f"moved back after {back} us, before the 30 us dwell"
        await settle_requests(h, host)
    finally:
        host.running = False
        await fw.close(dut)
        await host_job
        bridge.close()
    n_card, n_host = check_exactly_once(host, Path(folder) / "events.jsonl")
    assert n_card > 0 and n_host > 0, (n_card, n_host)
    dut._log.info("firmware placement: %d requests, %d served on the card, %d on the host; "
                  "threshold crossing to owner moved: %s (us, UART round trips)",
                  len(host.posted), n_card, n_host, latencies)
    bench_record("placement_latency", [
        {"resource": r, "threshold_to_owner_us": round(us, 2), "uart_round_trips": rt}
        for r, (us, rt) in zip(RESOURCES, latencies)])


def spawn_firmware(url, policy, folder, tag):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    with open(Path(folder) / f"firmware-{tag}.out", "w") as log:
        # the card answers in simulated time: at a few thousand clocks per wall second, on a
        # loaded machine, a UART round trip can take longer than silicon's 5 s default
        return subprocess.Popen([sys.executable, "-m", "firmware", "--port", url,
                                 "--policy", str(policy), "--link-timeout", "120"],
                                stdout=log, stderr=subprocess.STDOUT, env=env)


async def run_blocking(dut, fn, timeout_cycles=2_000_000):
    """Run the blocking ``fn`` (pyserial calls) in a thread while the simulation runs."""
    box = {}

    def body():
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e
    th = threading.Thread(target=body, daemon=True)
    th.start()
    waited = 0
    while th.is_alive():
        assert waited < timeout_cycles, "blocking call did not return"
        await ClockCycles(dut.clk, 500)
        waited += 500
    if "error" in box:
        raise box["error"]
    return box["value"]


@cocotb.test()
async def test_serial_pty_and_socket(dut):
    """pyserial reaches the card through a pty path and through a socket:// URL (what
    ``python -m serial.tools.miniterm`` or the firmware opens): ping, write, read back."""
    h, phy, _ = await start(dut)
    for mode in ("pty", "tcp"):
        bridge = UartBridge(phy, mode)

        def talk():
            with UartLink(bridge.url, timeout=60) as link:
                ident = link.ping()
                link.write(R.QOS_SEL, 5)
                link.write(R.QOS_BURST, 777)
                return ident, link.read(R.QOS_BURST), link.round_trips
        ident, burst, trips = await run_blocking(dut, talk)
        bridge.close()
        assert ident == MgmtRegs.CARD_ID_VALUE and burst == 777 and trips == 4, (mode, ident, burst)
        assert await h.drv.mgmt_read(R.QOS_BURST) == 777
        await h.drv.mgmt_write(R.QOS_BURST, 0)


@cocotb.test()
async def test_firmware_process_killed_mid_move(dut):
    """``python -m firmware --port socket://...`` in its own process: it moves the VM to the
    host on a threshold crossing; killed (SIGKILL) while a move waits for the host VM, the
    card's datapath and owner stay as they were, and a restarted firmware finishes or rolls
    back the move: one owner at every instant, every request served exactly once."""
    h, phy, _ = await start(dut)
    bridge = UartBridge(phy, "tcp")
    folder = tempfile.mkdtemp(prefix="offcard-fwp-")
    policy = write_policy(folder, handoff_timeout_us=1e6)
    host = HostSide(h)
    host_job = cocotb.start_soon(host.run())
    proc = spawn_firmware(bridge.url, policy, folder, "1")
    state = Path(folder) / "state.json"
    owners = []

    async def watch_owner():
        while host.running:
            owners.append(await owner_of(h))
            await ClockCycles(dut.clk, 300)
    watch = cocotb.start_soon(watch_owner())
    tag = "1"

    def alive():
        """The firmware we expect to be running still is (else its output, in the failure)."""
        if proc.poll() is not None:
            out = (Path(folder) / f"firmware-{tag}.out").read_text()
            raise AssertionError(f"firmware {tag} exited with {proc.returncode}: {out[-2000:]}")
    try:
        # the process is up and serving on the card
        t0 = h.t.now_ns()
        while not card_served_safe(Path(folder) / "events.jsonl"):
            alive()
            assert h.t.now_ns() - t0 < 5_000_000, "the firmware never served a request"
            await ClockCycles(dut.clk, 2000)
        # hold the host agent, cross the threshold: the firmware asks for the host VM and waits
        host.paused = True
        set_util(dut, processor=95)
        t0 = h.t.now_ns()
        while '"stopping_card"' not in (state.read_text() if state.exists() else ""):
            alive()
            assert h.t.now_ns() - t0 < 5_000_000, "the move never started"
            await ClockCycles(dut.clk, 1000)
        proc.send_signal(signal.SIGKILL)
        while proc.poll() is None:
            await ClockCycles(dut.clk, 200)
        assert await owner_of(h) == Owner.CARD
        # the card's datapath runs on without its firmware: a DMA round trip on the PF
        q = await DmaQueue(h.drv.pf, entries=8).setup()
        buf = (h.t.alloc_host_mem(0x3000) + 0xFFF) & ~0xFFF
        payload = bytes(range(256)) * 2
        await h.t.host_write(buf, payload)
        await q.transfer(buf, 0x100, len(payload), to_host=False)
        await q.transfer(buf + 0x1000, 0x100, len(payload), to_host=True)
        assert await h.t.host_read(buf + 0x1000, len(payload)) == payload
        host.paused = False
        tag = "2"
        proc = spawn_firmware(bridge.url, policy, folder, tag)
        await wait_owner(h, Owner.HOST, 20_000, alive=alive)
        set_util(dut)
        await wait_owner(h, Owner.CARD, 20_000, alive=alive)
        await settle_requests(h, host, 20_000, alive=alive)
    finally:
        host.running = False
        if proc.poll() is None:
            proc.terminate()
            while proc.poll() is None:
                await ClockCycles(dut.clk, 200)
        await watch
        await host_job
        bridge.close()
    assert set(owners) <= {Owner.CARD, Owner.HOST}, set(owners)
    events = [json.loads(line) for line in (Path(folder) / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    # the restart found the move before its flip and rolled it back, then moved again
    assert "move_rollback" in kinds and "move_done" in kinds, kinds[-20:]
    n_card, n_host = check_exactly_once(host, Path(folder) / "events.jsonl")
    dut._log.info("firmware process: killed mid-move and restarted; %d requests, %d on the "
                  "card, %d on the host; events %s", len(host.posted), n_card, n_host,
                  sorted(set(kinds)))


def card_served_safe(path):
    try:
        return card_served(path)
    except (FileNotFoundError, json.JSONDecodeError):
        return []
