"""virtio-net through the host driver's front-end: a driver on a function, frames, the
card's switch counters, receiving a number of frames."""

from cocotb.triggers import ClockCycles

from regmap import VirtioRegs as V, NetRegs
from host_driver.virtio import VirtioNetDriver, DirectAccess, TrappedAccess, HostMemory


def diff(got, want):
    """Where two frame lists first differ (for assertion messages)."""
    out = [f"{len(got)} frames, {len(want)} expected"]
    for k, (x, y) in enumerate(zip(got, want)):
        if x != y:
            first = next((i for i in range(min(len(x), len(y))) if x[i] != y[i]), None)
            out.append(f"#{k}: {len(x)} B vs {len(y)} B, first difference at {first}: "
                       f"got {x[first - 8:first + 16].hex()} want {y[first - 8:first + 16].hex()}")
    return "; ".join(out)


def mac_of(fidx):
    return V.MAC_PREFIX + bytes([fidx])


def frame(dst, src, n, rnd, ethertype=0x88B5):
    """An Ethernet frame of ``n`` bytes (header included) with a random payload."""
    return dst + src + ethertype.to_bytes(2, "big") + bytes(rnd.getrandbits(8) for _ in range(n - 14))


async def net(h, fn, trapped=False, queue_size=64, **kw):
    acc = TrappedAccess(fn) if trapped else DirectAccess(fn)
    d = VirtioNetDriver(acc, fn, HostMemory(h.t), queue_size=queue_size)
    await d.probe()
    await d.bring_up(**kw)
    return d


async def counters(h):
    return {n: await h.drv.mgmt_read(getattr(NetRegs, n)) for n in
            ("TX_FRAMES", "RX_FRAMES", "UPLINK_OUT", "UPLINK_IN", "DROP_NOBUF", "DROP_BAD",
             "DROP_UNKNOWN", "DROP_SIZE", "QUEUE_IRQS", "IRQ_SUPPRESSED", "XLATE_ERRORS",
             "CSUM_FILLED", "CSUM_VALID", "CSUM_BAD", "DROP_CSUM")}


async def receive_n(d, n, timeout_ns=400_000):
    got = []
    while len(got) < n:
        more = await d.receive(timeout_ns)
        if not more:
            break
        got += more
    return got


async def wait_needs_reset(dut, d, tries=100, clocks=100):
    """Until driver ``d``'s device sets NEEDS_RESET (checked every ``clocks``; fails after
    ``tries``)."""
    for _ in range(tries):
        if await d.read_status() & V.S_NEEDS_RESET:
            return
        await ClockCycles(dut.clk, clocks)
    raise AssertionError(f"{d.fn}: no NEEDS_RESET after {tries * clocks} clocks")
