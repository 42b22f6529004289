"""Unit tests of host_driver.system.mgmt_host against an in-file fake of the card's management
registers: the START/READY/STOP/STOPPED protocol, request serving by owner, ownership moves
mid-stream, and the vhost back-end."""

import asyncio
import pytest
from collections import deque
from host_driver.system.cgroup import HostCpu, Task
from host_driver.system.mgmt_host import VALID, HostAgent, Op, RingFull, VhostRing, decode, encode

from regmap import MgmtBlockRegs as R, Owner

HOST, CARD = "host", "card"


class FakeMgmtCard:
    """The task and mailbox registers of the management block, as the card implements them
    (regmap.MgmtBlockRegs). The host side is PF BAR2 (:attr:`host`), the card side the
    firmware's UART (:attr:`fw`). Every access yields to the event loop first, so concurrent
    coroutines interleave; ``before(side, kind, off)`` runs just before an access takes
    effect; while :attr:`pop_gate` is set, host REQ_POP reads wait for that event."""

    def __init__(self):
        self.owner = [Owner.CARD] * R.TASKS
        self.fifo = [deque() for _ in range(R.TASKS)]
        self.h2c, self.c2h = deque(), deque()
        self.owner_refused = self.pop_denied = self.req_refused = self.mbox_refused = 0
        self.before = None
        self.pop_gate: asyncio.Event | None = None
        self.host, self.fw = _Side(self, HOST), _Side(self, CARD)

    @staticmethod
    def _task(off, base):
        return (off - base) // 4 if base <= off < base + 4 * R.TASKS else None

    async def access(self, side, off, value=None):
        await asyncio.sleep(0)
        if (self.pop_gate is not None and side == HOST and value is None
                and self._task(off, R.REQ_POP) is not None):
            await self.pop_gate.wait()
        if self.before is not None:
            self.before(side, "write" if value is not None else "read", off)
        return self._write(side, off, value) if value is not None else self._read(side, off)

    def _read(self, side, off):
        if (t := self._task(off, R.OWNER)) is not None:
            return self.owner[t]
        if (t := self._task(off, R.REQ_LEVEL)) is not None:
            return len(self.fifo[t])
        if (t := self._task(off, R.REQ_POP)) is not None:
            if self.owner[t] != (Owner.HOST if side == HOST else Owner.CARD):
                self.pop_denied += 1
                return 0
            return VALID | self.fifo[t].popleft() if self.fifo[t] else 0
        mbox = {(HOST, R.MBOX_C2H): self.c2h, (CARD, R.MBOX_H2C): self.h2c}.get((side, off))
        if mbox is not None:
            return VALID | mbox.popleft() if mbox else 0
        if off == R.MBOX_STAT:
            return len(self.h2c) | len(self.c2h) << 8 | (self.mbox_refused & 0xFFFF) << 16
        counters = {R.OWNER_REFUSED: self.owner_refused, R.POP_DENIED: self.pop_denied,
                    R.REQ_REFUSED: self.req_refused}
        return counters.get(off, 0)

    def _write(self, side, off, value):
        value &= 0x7FFF_FFFF
        if (t := self._task(off, R.OWNER)) is not None:
            if value in (Owner.CARD, Owner.HOST):
                self.owner[t] = value
            else:
                self.owner_refused += 1
        elif (t := self._task(off, R.REQ_PUSH)) is not None:
            if len(self.fifo[t]) < R.REQ_DEPTH:
                self.fifo[t].append(value)
            else:
                self.req_refused += 1
        else:
            mbox = {(HOST, R.MBOX_H2C): self.h2c, (CARD, R.MBOX_C2H): self.c2h}.get((side, off))
            if mbox is not None:
                if len(mbox) < R.MBOX_DEPTH:
                    mbox.append(value)
                else:
                    self.mbox_refused += 1


class _Side:
    def __init__(self, card, side):
        self.card, self.side = card, side

    async def read(self, off):
        return await self.card.access(self.side, off)

    async def write(self, off, value):
        await self.card.access(self.side, off, value)


# ---- the firmware's half, just enough to drive the agent ----
async def fw_send(card, op, task, arg=0):
    await card.fw.write(R.MBOX_C2H, encode(op, task, arg))


async def fw_recv(card):
    out = []
    while (w := await card.fw.read(R.MBOX_H2C)) & VALID:
        out.append(decode(w))
    return out


async def fw_pop_all(card, task):
    out = []
    while (w := await card.fw.read(R.REQ_POP + 4 * task)) & VALID:
        out.append(w & 0x7FFF_FFFF)
    return out


async def push(card, task, words):
    for w in words:
        await card.host.write(R.REQ_PUSH + 4 * task, w)


def run(coro):
    return asyncio.run(coro)


# ---- the fake itself ----
def test_fake_card_enforces_owner_and_depths():
    async def main():
        card = FakeMgmtCard()
        await card.fw.write(R.OWNER, 3)
        assert card.owner[0] == Owner.CARD and await card.host.read(R.OWNER_REFUSED) == 1
        await push(card, 0, range(R.REQ_DEPTH + 2))
        assert await card.host.read(R.REQ_REFUSED) == 2
        assert await card.host.read(R.REQ_POP) == 0 and card.pop_denied == 1
        assert await card.fw.read(R.REQ_POP) == VALID | 0
        for i in range(R.MBOX_DEPTH + 1):
            await card.host.write(R.MBOX_H2C, i)
        assert await card.host.read(R.MBOX_STAT) == R.MBOX_DEPTH | 1 << 16
        assert await card.host.read(R.MBOX_H2C) == 0       # the sender cannot pop its own
    run(main())


def test_encode_decode():
    w = encode(Op.REFUSED, 3, 0xBEEF)
    assert w == 0x1303_BEEF and decode(w | VALID) == (Op.REFUSED, 3, 0xBEEF)
    with pytest.raises(ValueError):
        encode(0x80, 0)
    with pytest.raises(ValueError):
        encode(Op.START, 0, 0x10000)


# ---- the placement protocol ----
def test_start_ready_stop_stopped_in_own_cgroup():
    async def main():
        card = FakeMgmtCard()
        cpu = HostCpu(2)
        cpu.cgroup("machine.slice/user-vms", max_quota_us=150_000).attach(Task("noisy", 2))
        agent = HostAgent(card.host, cpu)
        await fw_send(card, Op.START, 1)
        assert await agent.poll() == 1
        assert await fw_recv(card) == [(Op.READY, 1, 0)]
        vm = agent.vms[1]
        assert vm.running and vm.cgroup is cpu.find("mgmt.slice/1")
        assert vm.cgroup.tasks == [vm.work]
        assert cpu.find("machine.slice").tasks == [] and "mgmt.slice" in cpu.root.children
        await fw_send(card, Op.STOP, 1)
        await agent.poll()
        assert await fw_recv(card) == [(Op.STOPPED, 1, 0)]
        assert not vm.running
        assert agent.log == [("start", 1), ("ready", 1), ("stop", 1), ("stopped", 1)]
    run(main())


def test_stop_and_start_are_idempotent():
    async def main():
        card = FakeMgmtCard()
        agent = HostAgent(card.host)
        await fw_send(card, Op.STOP, 2)                  # never started: still STOPPED
        await fw_send(card, Op.START, 0)
        await fw_send(card, Op.START, 0)                 # running: READY again
        await agent.poll()
        vm = agent.vms[0]
        await fw_send(card, Op.STOP, 0)
        await fw_send(card, Op.STOP, 0)                  # a restarted firmware resends it
        await fw_send(card, Op.START, 0)                 # back on the host: the same VM
        assert await agent.poll() == 3
        assert await fw_recv(card) == [(Op.STOPPED, 2, 0), (Op.READY, 0, 0), (Op.READY, 0, 0),
                                       (Op.STOPPED, 0, 0), (Op.STOPPED, 0, 0), (Op.READY, 0, 0)]
        assert agent.vms[0] is vm and vm.running and 2 not in agent.vms
        assert [e for e in agent.log if e[0] in ("start", "stop")] == \
            [("start", 0), ("stop", 0), ("start", 0)]
    run(main())


def test_unknown_op_or_task_is_refused():
    async def main():
        card = FakeMgmtCard()
        agent = HostAgent(card.host, tasks=[0, 1])
        await fw_send(card, 0x7F, 0)
        await fw_send(card, Op.START, 2)                 # not one of this agent's tasks
        await fw_send(card, Op.READY, 1)                 # a host -> firmware op
        await agent.poll()
        assert await fw_recv(card) == [(Op.REFUSED, 0, 0x7F), (Op.REFUSED, 2, Op.START),
                                       (Op.REFUSED, 1, Op.READY)]
        assert agent.vms == {}
    run(main())


def test_replies_wait_for_room_in_the_mailbox():
    async def main():
        card = FakeMgmtCard()
        agent = HostAgent(card.host)
        for _ in range(R.MBOX_DEPTH):
            await fw_send(card, Op.STOP, 3)
        await agent.poll()                               # H2C now full of STOPPED
        await fw_send(card, Op.START, 3)
        await agent.poll()
        assert len(agent.outbox) == 1 and card.mbox_refused == 0
        assert len(await fw_recv(card)) == R.MBOX_DEPTH
        await agent.poll()
        assert await fw_recv(card) == [(Op.READY, 3, 0)]
        assert agent.outbox == [] and card.mbox_refused == 0
    run(main())


# ---- serving requests ----
async def started(card, agent, task):
    await fw_send(card, Op.START, task)
    await agent.poll()
    assert await fw_recv(card) == [(Op.READY, task, 0)]
    return agent.vms[task]


def test_host_vm_serves_only_while_host_owns_the_task():
    async def main():
        card = FakeMgmtCard()
        agent = HostAgent(card.host)
        vm = await started(card, agent, 0)
        await push(card, 0, [10, 11, 12])
        assert await agent.serve() == 0 and len(card.fifo[0]) == 3
        assert card.pop_denied == 0                      # it asked OWNER first
        card.owner[0] = Owner.HOST
        assert await agent.serve() == 3 and vm.served == [10, 11, 12]
        await fw_send(card, Op.STOP, 0)
        await agent.poll()
        await push(card, 0, [13])
        assert await agent.serve() == 0 and list(card.fifo[0]) == [13]   # stopped: no pops
        assert card.pop_denied == 0
    run(main())


def test_pop_after_owner_moved_is_denied_by_the_card():
    """Ownership moves between the VM's OWNER read and its pop: the card refuses the pop."""
    async def main():
        card = FakeMgmtCard()
        agent = HostAgent(card.host)
        vm = await started(card, agent, 0)
        card.owner[0] = Owner.HOST
        await push(card, 0, [1, 2, 3])

        def flip(side, kind, off):
            if side == HOST and off == R.REQ_POP:
                card.owner[0] = Owner.CARD
        card.before = flip
        assert await agent.serve() == 0
        card.before = None
        assert vm.served == [] and card.pop_denied == 1
        assert await fw_pop_all(card, 0) == [1, 2, 3]
    run(main())


def test_ownership_moves_mid_stream_lose_and_duplicate_nothing():
    async def main():
        card = FakeMgmtCard()
        agent = HostAgent(card.host)
        vm = await started(card, agent, 2)
        await card.fw.write(R.OWNER + 8, Owner.HOST)
        sent = list(range(100, 112))
        await push(card, 2, sent[:8])
        assert await vm.serve(budget=5) == 5
        # The firmware moves the task to the card: STOP, wait for STOPPED, then OWNER.
        await fw_send(card, Op.STOP, 2)
        await push(card, 2, sent[8:10])                  # requests keep coming
        await agent.step()
        assert await fw_recv(card) == [(Op.STOPPED, 2, 0)]
        await card.fw.write(R.OWNER + 8, Owner.CARD)
        by_card = await fw_pop_all(card, 2)
        await push(card, 2, sent[10:])
        # ... and back: START, wait for READY, then OWNER.
        await fw_send(card, Op.START, 2)
        await agent.poll()
        assert await fw_recv(card) == [(Op.READY, 2, 0)]
        await card.fw.write(R.OWNER + 8, Owner.HOST)
        await agent.serve()
        assert vm.served[:5] + by_card + vm.served[5:] == sent
        assert by_card == sent[5:10] and card.pop_denied == 0
    run(main())


def test_stop_while_a_pop_is_in_flight_waits_for_it():
    async def main():
        card = FakeMgmtCard()
        agent = HostAgent(card.host)
        vm = await started(card, agent, 1)
        card.owner[1] = Owner.HOST
        await push(card, 1, [7, 8, 9])
        card.pop_gate = asyncio.Event()
        serving = asyncio.ensure_future(agent.serve())
        while not vm.popping:
            await asyncio.sleep(0)
        await fw_send(card, Op.STOP, 1)
        await agent.poll()
        assert not vm.running and await fw_recv(card) == []   # not yet: a pop is in flight
        card.pop_gate.set()
        assert await serving == 1
        assert vm.served == [7]
        assert await fw_recv(card) == [(Op.STOPPED, 1, 0)]
        assert list(card.fifo[1]) == [8, 9]                    # no further pops
    run(main())


def test_concurrent_poll_and_serve_loops():
    """The agent's poll and serve loops run side by side while the firmware moves the task
    back and forth and requests keep coming: each request is served once, none is lost."""
    async def main():
        card = FakeMgmtCard()
        agent = HostAgent(card.host)
        sent, by_card, running = list(range(1, 201)), [], True

        async def loop(fn):
            while running:
                await fn()

        async def move(op, reply, owner):
            await fw_send(card, op, 3)
            while await fw_recv(card) != [(reply, 3, 0)]:
                await asyncio.sleep(0)
            await card.fw.write(R.OWNER + 12, owner)

        loops = [asyncio.ensure_future(loop(agent.poll)), asyncio.ensure_future(loop(agent.serve))]
        for k in range(0, len(sent), 20):
            await push(card, 3, sent[k:k + 10])
            if k % 40 == 0:
                await move(Op.START, Op.READY, Owner.HOST)
            else:
                await move(Op.STOP, Op.STOPPED, Owner.CARD)
            await push(card, 3, sent[k + 10:k + 20])
            for _ in range(50):
                await asyncio.sleep(0)
            if card.owner[3] == Owner.CARD:
                by_card += await fw_pop_all(card, 3)
        await move(Op.STOP, Op.STOPPED, Owner.CARD)
        by_card += await fw_pop_all(card, 3)
        running = False
        await asyncio.gather(*loops)
        host = agent.vms[3].served
        assert sorted(host + by_card) == sent            # none lost, none twice
        assert host == sorted(host) and by_card == sorted(by_card)
        assert len(host) > 50 and len(by_card) > 50 and card.pop_denied == 0
    run(main())


# ---- vhost back-end ----
def test_vhost_round_trip_host_owned():
    async def main():
        card = FakeMgmtCard()
        agent = HostAgent(card.host)
        vm = await started(card, agent, 0)
        card.owner[0] = Owner.HOST
        ring = agent.vhost[0].add_ring(VhostRing(8))
        ids = [ring.post(w) for w in (0x11, 0x22, 0x7FFF_FFFF)]
        await agent.serve()                              # pushed into the card FIFO
        assert ring.reap() == [] and len(card.fifo[0]) == 3
        await agent.serve()                              # popped by the VM, then completed
        assert vm.served == [0x11, 0x22, 0x7FFF_FFFF]
        assert ring.reap() == list(zip(ids, vm.served))
        assert ring.reap() == []
    run(main())


def test_vhost_card_owned_backpressure_and_two_guests():
    async def main():
        card = FakeMgmtCard()
        agent = HostAgent(card.host)
        backend = agent.vhost[1]
        a, b = backend.add_ring(VhostRing(16)), backend.add_ring(VhostRing(16))
        for i in range(12):
            a.post(0x1000 + i)
            b.post(0x2000 + i)
        with pytest.raises(RingFull):
            for i in range(5):
                a.post(0x1100 + i)
        assert a.avail_idx == 16
        await agent.serve()
        assert len(card.fifo[1]) == R.REQ_DEPTH and card.req_refused == 0
        assert list(card.fifo[1])[:4] == [0x1000, 0x2000, 0x1001, 0x2001]   # turn by turn
        await agent.serve()
        assert a.reap() == [] and b.reap() == []         # the card has popped nothing yet
        by_card = []
        for _ in range(5):
            by_card += await fw_pop_all(card, 1)
            await agent.serve()
        got_a, got_b = a.reap(), b.reap()
        assert [w for _, w in got_a] == [*range(0x1000, 0x100C), *range(0x1100, 0x1104)]
        assert [i for i, _ in got_a] == list(range(16))
        assert [w for _, w in got_b] == list(range(0x2000, 0x200C))
        assert sorted(by_card) == sorted(w for _, w in got_a + got_b)
        assert card.req_refused == 0 and agent.vms == {}
    run(main())


def test_served_requests_run_in_the_mgmt_cgroup():
    """Each request the host VM serves is 200 us of work in mgmt.slice/<t>: next to a noisy
    8-vCPU user VM held to 1.5 CPUs, every request still finishes in its 200 us."""
    async def main():
        card = FakeMgmtCard()
        cpu = HostCpu(2)
        user = cpu.cgroup("machine.slice/user-vms", max_quota_us=150_000)
        user.attach(Task("noisy", vcpus=8))
        agent = HostAgent(card.host, cpu, cost_us=200)
        vm = await started(card, agent, 0)
        card.owner[0] = Owner.HOST
        for i in range(300):                             # one request per ms, 0.3 s
            await push(card, 0, [i])
            await agent.serve()
            cpu.run(1_000)
        assert vm.served == list(range(300))
        assert vm.work.latencies == [200] * 300
        assert cpu.report()["mgmt.slice/0"]["cpus"] == pytest.approx(0.2)
        assert cpu.report()["machine.slice/user-vms"]["nr_throttled"] == 3
    run(main())
