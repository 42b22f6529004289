"""host_driver.vf_state: a stopped function reads "not idle" for a few clocks while the engine
drops a frame addressed to it, and the card ignores index writes while it is not idle. The
export waits the moment out; the index writes are read back and repeated until they hold.
A fake of the migration registers (PF BAR2 ``MigRegs``) models exactly that."""

import asyncio

import pytest

from regmap import MigRegs as MG
from host_driver.vf_state import CardVfState, VfStateError

NQ = 3                      # queues the tests restore


class FakeT:
    def __init__(self):
        self.ns = 0

    def now_ns(self):
        return self.ns

    async def sleep_ns(self, ns):
        self.ns += ns
        await asyncio.sleep(0)


class FakeMig:
    """``busy_reads``: how many STATUS reads (and index writes meanwhile) see the engine busy
    with the function (a frame for it being dropped); ``stopped``: MIG_CTRL bit 0."""

    def __init__(self, busy_reads=0, busy_writes=0, stopped=True):
        self.busy_reads, self.busy_writes = busy_reads, busy_writes
        self.stopped = stopped
        self.q = 0
        self.idx = {q: [0, 0] for q in range(NQ)}       # queue -> [avail, used]
        self.pend = 0
        self.ignored = 0
        self.t = FakeT()

    def indices(self):
        return [tuple(self.idx[q]) for q in range(NQ)]

    async def mgmt_read(self, reg):
        if reg == MG.STATUS:
            busy = self.busy_reads > 0
            self.busy_reads -= busy
            return int(self.stopped) | (int(self.stopped and not busy) << 1)
        if reg == MG.Q_AVAIL:
            return self.idx[self.q][0]
        if reg == MG.Q_USED:
            return self.idx[self.q][1]
        return {MG.TX_PEND: self.pend, MG.Q_SEL: self.q}[reg]

    async def mgmt_write(self, reg, value):
        if reg in (MG.Q_AVAIL, MG.Q_USED, MG.TX_PEND):
            if self.busy_writes > 0:                 # not idle: the card ignores it
                self.busy_writes -= 1
                self.ignored += 1
                return
            if reg == MG.TX_PEND:
                self.pend = value & 1
            else:
                self.idx[self.q][reg == MG.Q_USED] = value & 0xFFFF
        elif reg == MG.Q_SEL:
            self.q = value
        elif reg == MG.CTRL:
            self.stopped = bool(value & 1)


class Fn:
    index = 3

    def __init__(self, t):
        self.t = t

    def __repr__(self):
        return "<VF3>"


def run(coro):
    return asyncio.run(coro)


def test_indices_written_again_when_the_card_ignored_them():
    mig = FakeMig(busy_writes=3)
    st = CardVfState(mig)
    run(st.write_indices(Fn(mig.t), {0: (7, 5), 1: (300, 299), 2: (0x1_0002, 9)}, 1))
    assert mig.ignored == 3
    assert mig.indices() == [(7, 5), (300, 299), (2, 9)] and mig.pend == 1


def test_indices_wait_for_idle_first():
    mig = FakeMig(busy_reads=4)
    st = CardVfState(mig, poll_ns=100)
    run(st.write_indices(Fn(mig.t), {0: (1, 2), 1: (3, 4)}))
    assert mig.t.ns == 400 and mig.indices()[:2] == [(1, 2), (3, 4)]


def test_indices_of_a_running_function_are_refused():
    mig = FakeMig(stopped=False)
    with pytest.raises(VfStateError, match="not stopped"):
        run(CardVfState(mig).write_indices(Fn(mig.t), {0: (1, 2), 1: (3, 4)}))


def test_a_card_that_never_takes_them_is_an_error_not_a_hang():
    mig = FakeMig(busy_writes=10**6)
    with pytest.raises(VfStateError, match="kept ignoring"):
        run(CardVfState(mig).write_indices(Fn(mig.t), {0: (1, 2), 1: (3, 4)}))


def test_quiesce_waits_out_a_busy_moment_and_times_out_on_a_stuck_one():
    mig = FakeMig(busy_reads=3, stopped=False)
    st = CardVfState(mig, poll_ns=100, idle_timeout_ns=10_000)
    run(st.quiesce(Fn(mig.t)))
    assert mig.stopped and mig.t.ns == 300
    stuck = FakeMig(busy_reads=10**6)
    with pytest.raises(VfStateError, match="not idle 10000 ns"):
        run(CardVfState(stuck, poll_ns=100, idle_timeout_ns=10_000).quiesce(Fn(stuck.t)))
