"""Unit tests of host_driver.system.mgmt_host against the fake of the card's management block
(:class:`fakes.FakeMgmtBlock`, through its asynchronous ports: the host agent on PF BAR2, the
firmware's half on the UART side): the START/READY/STOP/STOPPED protocol, request serving by
owner, ownership moves mid-stream, and the vhost back-end."""

import asyncio
import pytest
from fakes import FakeMgmtBlock
from host_driver.system.cgroup import HostCpu, Task
from host_driver.system.mgmt_host import VALID, HostAgent, Op, RingFull, VhostRing, decode, encode

from regmap import MgmtBlockRegs as R, Owner

HOST = "host"


# ---- the firmware's half, just enough to drive the agent ----
async def fw_send(card, op, task, arg=0):
    await card.card_async.write(R.MBOX_C2H, encode(op, task, arg))


async def fw_recv(card):
    out = []
    while (w := await card.card_async.read(R.MBOX_H2C)) & VALID:
        out.append(decode(w))
    return out


async def fw_pop_all(card, task):
    out = []
    while (w := await card.card_async.read(R.REQ_POP + 4 * task)) & VALID:
        out.append(w & 0x7FFF_FFFF)
    return out


async def push(card, task, words):
    for w in words:
        await card.host_async.write(R.REQ_PUSH + 4 * task, w)


def run(coro):
    return asyncio.run(coro)


# ---- the fake itself ----
def test_fake_card_enforces_owner_and_depths():
    async def main():
        card = FakeMgmtBlock()
        await card.card_async.write(R.OWNER, 3)
        assert card.owners[0] == Owner.CARD and await card.host_async.read(R.OWNER_REFUSED) == 1
        await push(card, 0, range(R.REQ_DEPTH + 2))
        assert await card.host_async.read(R.REQ_REFUSED) == 2
        assert await card.host_async.read(R.REQ_POP) == 0 and card.pop_denied == 1
        assert await card.card_async.read(R.REQ_POP) == VALID | 0
        for i in range(R.MBOX_DEPTH + 1):
            await card.host_async.write(R.MBOX_H2C, i)
        assert await card.host_async.read(R.MBOX_STAT) == R.MBOX_DEPTH | 1 << 16
        assert await card.host_async.read(R.MBOX_H2C) == 0       # the sender cannot pop its own
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
        card = FakeMgmtBlock()
        cpu = HostCpu(2)
        cpu.cgroup("machine.slice/user-vms", max_quota_us=150_000).attach(Task("noisy", 2))
        agent = HostAgent(card.host_async, cpu)
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
        card = FakeMgmtBlock()
        agent = HostAgent(card.host_async)
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
        card = FakeMgmtBlock()
        agent = HostAgent(card.host_async, tasks=[0, 1])
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
        card = FakeMgmtBlock()
        agent = HostAgent(card.host_async)
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
        card = FakeMgmtBlock()
        agent = HostAgent(card.host_async)
        vm = await started(card, agent, 0)
        await push(card, 0, [10, 11, 12])
        assert await agent.serve() == 0 and len(card.fifos[0]) == 3
        assert card.pop_denied == 0                      # it asked OWNER first
        card.owners[0] = Owner.HOST
        assert await agent.serve() == 3 and vm.served == [10, 11, 12]
        await fw_send(card, Op.STOP, 0)
        await agent.poll()
        await push(card, 0, [13])
        assert await agent.serve() == 0 and list(card.fifos[0]) == [13]   # stopped: no pops
        assert card.pop_denied == 0
    run(main())


def test_pop_after_owner_moved_is_denied_by_the_card():
    """Ownership moves between the VM's OWNER read and its pop: the card refuses the pop."""
    async def main():
        card = FakeMgmtBlock()
        agent = HostAgent(card.host_async)
        vm = await started(card, agent, 0)
        card.owners[0] = Owner.HOST
        await push(card, 0, [1, 2, 3])

        def flip(side, kind, off):
            if side == HOST and off == R.REQ_POP:
                card.owners[0] = Owner.CARD
        card.before = flip
        assert await agent.serve() == 0
        card.before = None
        assert vm.served == [] and card.pop_denied == 1
        assert await fw_pop_all(card, 0) == [1, 2, 3]
    run(main())


def test_ownership_moves_mid_stream_lose_and_duplicate_nothing():
    async def main():
        card = FakeMgmtBlock()
        agent = HostAgent(card.host_async)
        vm = await started(card, agent, 2)
        await card.card_async.write(R.OWNER + 8, Owner.HOST)
        sent = list(range(100, 112))
        await push(card, 2, sent[:8])
        assert await vm.serve(budget=5) == 5
        # The firmware moves the task to the card: STOP, wait for STOPPED, then OWNER.
        await fw_send(card, Op.STOP, 2)
        await push(card, 2, sent[8:10])                  # requests keep coming
        await agent.step()
        assert await fw_recv(card) == [(Op.STOPPED, 2, 0)]
        await card.card_async.write(R.OWNER + 8, Owner.CARD)
        by_card = await fw_pop_all(card, 2)
        await push(card, 2, sent[10:])
        # ... and back: START, wait for READY, then OWNER.
        await fw_send(card, Op.START, 2)
        await agent.poll()
        assert await fw_recv(card) == [(Op.READY, 2, 0)]
        await card.card_async.write(R.OWNER + 8, Owner.HOST)
        await agent.serve()
        assert vm.served[:5] + by_card + vm.served[5:] == sent
        assert by_card == sent[5:10] and card.pop_denied == 0
    run(main())


def test_stop_while_a_pop_is_in_flight_waits_for_it():
    async def main():
        card = FakeMgmtBlock()
        agent = HostAgent(card.host_async)
        vm = await started(card, agent, 1)
        card.owners[1] = Owner.HOST
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
        assert list(card.fifos[1]) == [8, 9]                    # no further pops
    run(main())


def test_concurrent_poll_and_serve_loops():
    """The agent's poll and serve loops run side by side while the firmware moves the task
    back and forth and requests keep coming: each request is served once, none is lost."""
    async def main():
        card = FakeMgmtBlock()
        agent = HostAgent(card.host_async)
        sent, by_card, running = list(range(1, 201)), [], True

        async def loop(fn):
            while running:
                await fn()

        async def move(op, reply, owner):
            await fw_send(card, op, 3)
            while await fw_recv(card) != [(reply, 3, 0)]:
                await asyncio.sleep(0)
            await card.card_async.write(R.OWNER + 12, owner)

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
            if card.owners[3] == Owner.CARD:
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
        card = FakeMgmtBlock()
        agent = HostAgent(card.host_async)
        vm = await started(card, agent, 0)
        card.owners[0] = Owner.HOST
        ring = agent.vhost[0].add_ring(VhostRing(8))
        ids = [ring.post(w) for w in (0x11, 0x22, 0x7FFF_FFFF)]
        await agent.serve()                              # pushed into the card FIFO
        assert ring.reap() == [] and len(card.fifos[0]) == 3
        await agent.serve()                              # popped by the VM, then completed
        assert vm.served == [0x11, 0x22, 0x7FFF_FFFF]
        assert ring.reap() == list(zip(ids, vm.served))
        assert ring.reap() == []
    run(main())


def test_vhost_card_owned_backpressure_and_two_guests():
    async def main():
        card = FakeMgmtBlock()
        agent = HostAgent(card.host_async)
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
        assert len(card.fifos[1]) == R.REQ_DEPTH and card.req_refused == 0
        assert list(card.fifos[1])[:4] == [0x1000, 0x2000, 0x1001, 0x2001]   # turn by turn
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
        card = FakeMgmtBlock()
        cpu = HostCpu(2)
        user = cpu.cgroup("machine.slice/user-vms", max_quota_us=150_000)
        user.attach(Task("noisy", vcpus=8))
        agent = HostAgent(card.host_async, cpu, cost_us=200)
        vm = await started(card, agent, 0)
        card.owners[0] = Owner.HOST
        for i in range(300):                             # one request per ms, 0.3 s
            await push(card, 0, [i])
            await agent.serve()
            cpu.run(1_000)
        assert vm.served == list(range(300))
        assert vm.work.latencies == [200] * 300
        assert cpu.report()["mgmt.slice/0"]["cpus"] == pytest.approx(0.2)
        assert cpu.report()["machine.slice/user-vms"]["nr_throttled"] == 3
    run(main())
