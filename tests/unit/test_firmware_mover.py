"""The card wrapper, state file, event log, mover and daemon against the fake card.

The invariants checked after every poll: each task has exactly one valid owner, the firmware's
placement equals the card's owner registers, the host owns only tasks whose VM is running, the
card side never pops a task it does not own; and at the end every pushed request was served
exactly once, by whoever owned its task at pop time.
"""

import dataclasses
import json
import os
import tempfile
import pytest
from fakes import CardCrash, FakeHostAgent, FakeMgmtBlock, VALID
from firmware.card import READY, START, STOP, Card, CardError, decode_msg, encode_msg
from firmware.daemon import Firmware
from firmware.eventlog import EventLog
from firmware.mover import recover
from firmware.placement import CARD, HOST
from firmware.policy import parse_policy
from firmware.state import FirmwareState, MoveRecord, StateError, StateStore
from hypothesis import HealthCheck, given, settings, strategies as st
from pathlib import Path

from regmap import MgmtBlockRegs as R, Owner

RES = ("custom_hw", "processor", "memory", "network")
OWNER_NAME = {Owner.CARD: CARD, Owner.HOST: HOST}
NOOP_REQ = 0x20


# -- Card ----------------------------------------------------------------------------------
def test_card_util_and_block_id():
    fc = FakeMgmtBlock()
    fc.set_util(custom_hw=1, processor=2, memory=3, network=100)
    card = Card(fc.card_port)
    assert card.block_id() == R.BLOCK_ID_VALUE
    assert card.util() == {"custom_hw": 1, "processor": 2, "memory": 3, "network": 100}


def test_card_cycles_extend_across_wraps():
    fc = FakeMgmtBlock(cycles_per_access=0, cycles=(5 << 32) + 0xFFFF_FF00)
    card = Card(fc.card_port)
    assert card.cycles() == (5 << 32) + 0xFFFF_FF00       # base from the latched HI
    seen = []
    for step in (0x80, 0x100, 0xFFFF_FFF0, 0x20):
        fc.advance(step)
        seen.append(card.cycles())
        assert seen[-1] == fc.cycles
    assert seen == sorted(seen)
    assert fc.accesses["card"] == 2 + 4                   # later calls read CYCLES_LO only


def test_card_owner_write_and_read_back():
    fc = FakeMgmtBlock()
    card = Card(fc.card_port)
    card.set_owner(2, Owner.HOST)
    assert card.owner(2) == Owner.HOST and fc.owners == [1, 1, 2, 1]
    with pytest.raises(ValueError):
        card.set_owner(2, 3)            # never written: the hardware would refuse it anyway
    with pytest.raises(ValueError):
        card.owner(4)
    assert fc.owner_refused == 0


def test_card_owner_mismatch_raises():
    class Stuck:                        # a port whose owner registers ignore writes
        def read(self, addr):
            return Owner.CARD

        def write(self, addr, value):
            pass
    with pytest.raises(CardError, match="owner reads back 1, wrote 2"):
        Card(Stuck()).set_owner(0, Owner.HOST)


def test_card_pop_only_by_owner():
    fc = FakeMgmtBlock()
    card, host = Card(fc.card_port), Card(fc.host_port)
    assert fc.push(1, 0x1234) and fc.push(1, 0x7FFF_FFFF)
    assert card.req_level(1) == 2
    assert host.pop(1) is None and fc.pop_denied == 1
    assert card.pop(1) == 0x1234 and card.pop(1) == 0x7FFF_FFFF and card.pop(1) is None
    for i in range(R.REQ_DEPTH):
        assert fc.push(0, i)
    assert not fc.push(0, 99) and fc.req_refused == 1


def test_card_mailbox():
    fc = FakeMgmtBlock()
    card, host = Card(fc.card_port), Card(fc.host_port)
    assert card.mbox_recv() is None
    card.mbox_send(encode_msg(START, 3))
    assert decode_msg(fc.host_port.read(R.MBOX_C2H)) == (START, 3, 0)
    fc.host_port.write(R.MBOX_H2C, encode_msg(READY, 3, 0xBEEF))
    assert decode_msg(card.mbox_recv()) == (READY, 3, 0xBEEF)
    for _ in range(R.MBOX_DEPTH):
        card.mbox_send(1)
    with pytest.raises(CardError, match="full"):
        card.mbox_send(1)
    with pytest.raises(ValueError):
        card.mbox_send(1 << 31)
    assert host.mbox_recv() is None     # the sending side cannot pop its own FIFO


def test_msg_encoding():
    w = encode_msg(0x13, 0xAB, 0xCDEF)
    assert w == 0x13AB_CDEF and w < 1 << 31
    assert decode_msg(w | VALID) == (0x13, 0xAB, 0xCDEF)
    for bad in ((0x80, 0), (1, 0x100), (1, 0, 0x10000), (-1, 0)):
        with pytest.raises(ValueError):
            encode_msg(*bad)


def test_card_qos_and_telemetry():
    fc = FakeMgmtBlock()
    card = Card(fc.card_port)
    assert card.set_qos(5, 0.5, 4096) == 128
    assert fc.qos[5] == [128, 4096]
    card.set_qos(5, 0, 0)
    assert fc.qos[5] == [0, 0]
    assert card.set_qos(6, 0xFFFF / 256, 0x7FFF) == 0xFFFF
    for rate, burst in ((-1, 0), (256.0, 0), (0.001, 0), (1, 0x8000), (1, -1), (True, 1)):
        with pytest.raises(ValueError):
            card.set_qos(1, rate, burst)
    fc.tel[7][R.TEL_TX_BYTES] = 1500
    fc.tel[7][R.TEL_QOS_WAIT] = 3
    tel = card.telemetry(7)
    assert tel["tx_bytes"] == 1500 and tel["qos_wait"] == 3 and tel["faults"] == 0
    assert set(tel) == {"tx_bytes", "tx_frames", "rx_bytes", "rx_frames", "dma_busy", "faults",
                        "occupancy", "qos_wait"}


# -- state file and event log ------------------------------------------------------------------
def test_state_round_trip_and_missing_file(tmp_path):
    store = StateStore(str(tmp_path / "s.json"))
    assert store.load() == FirmwareState()
    st_ = FirmwareState(placement={"a": CARD, "b": HOST}, seq=9,
                        moves={"a": MoveRecord("a", 0, HOST, "flip", 1.5, 10.0)})
    store.save(st_)
    assert store.load() == st_
    assert os.listdir(tmp_path) == ["s.json"]          # no temporary file left behind


def test_state_write_is_atomic(tmp_path, monkeypatch):
    store = StateStore(str(tmp_path / "s.json"))
    store.save(FirmwareState(placement={"a": CARD}))

    def boom(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(StateError, match="cannot write state: No space left on device"):
        store.save(FirmwareState(placement={"a": HOST}))
    monkeypatch.undo()
    assert store.load().placement == {"a": CARD}
    assert os.listdir(tmp_path) == ["s.json"]


@pytest.mark.parametrize("text,want", [
    ("{not json", "corrupt state file: Expecting property name"),
    ("[]", "corrupt state file: top level is not an object"),
    ('{"version": 7}', "corrupt state file: version 7, expected 1"),
    ('{"version": 1, "placement": {"a": "moon"}}', "placement must map"),
    ('{"version": 1, "moves": {"a": {"task": "a"}}}', "move 'a'"),
    ('{"version": 1, "moves": {"a": {"task": "a", "index": 0, "to": "host", "phase": "flap", '
     '"since_us": 0, "deadline_us": 0}}}', "move 'a': bad record"),
    (b"\xff\xfe", "corrupt state file"),
])
def test_corrupt_state_is_one_line(tmp_path, text, want):
    path = tmp_path / "s.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(StateError) as e:
        StateStore(str(path)).load()
    assert "\n" not in str(e.value) and str(e.value).startswith(str(path))
    assert want in str(e.value)


def test_event_log_lines_and_sequence(tmp_path):
    path = str(tmp_path / "e.jsonl")
    log = EventLog(path)
    log.emit(1.0, "start")
    assert log.util_sample(2.0, {"processor": 5}) and not log.util_sample(3.0, {"processor": 5})
    assert log.util_sample(4.0, {"processor": 6})
    with pytest.raises(ValueError):
        log.emit(5.0, "made_up")
    assert len(open(path).read().splitlines()) == 3       # flushed per line, file still open
    log.close()
    with open(path, "a") as f:
        f.write('{"seq": 4, "t_us": 5, "ev')               # a line cut short by a crash
    log = EventLog(path, seq=2)
    log.emit(6.0, "error", message="x")
    log.close()
    lines = open(path).read().splitlines()
    assert json.loads(lines[-1]) == {"seq": 4, "t_us": 6.0, "event": "error", "message": "x"}
    assert [json.loads(x)["seq"] for x in lines[:3]] == [1, 2, 3]


# -- the rig: fake card + host agent + firmware ------------------------------------------------
POLICY = """\
[card]
clock_mhz = 125.0
[thresholds]
custom_hw = 80
processor = 75
memory = 85
network = 70
[placement]
strategy = "{strategy}"
dwell_us = {dwell}
poll_us = 20.0
handoff_timeout_us = {handoff}
stop_timeout_us = 300.0
[[task]]
name = "qos"
index = 0
priority = 3
cost = {{ custom_hw = 2, processor = 10, memory = 5 }}
[[task]]
name = "mon"
index = 1
priority = 1
cost = {{ processor = 5, memory = 2 }}
[[task]]
name = "log"
index = 3
priority = 2
cost = {{ processor = 3, network = 4 }}
"""


class Rig:
    """A fake card, a host agent, a firmware, and the requests pushed so far.

    ``base`` is the utilisation without the management VMs; :meth:`poll` sets UTIL to it plus
    the cost of every task the card owns (``model=True``), or to ``base`` alone."""

    POLL_CYCLES = 2500              # 20 µs at 125 MHz between polls

    def __init__(self, dirname, *, strategy="priority", dwell=100.0, handoff=300.0,
                 tasks=("qos", "mon", "log"), model=True, **agent):
        text = POLICY.format(strategy=strategy, dwell=dwell, handoff=handoff)
        policy = parse_policy(text)
        policy = dataclasses.replace(
            policy, tasks=tuple(t for t in policy.tasks if t.name in tasks),
            state_path=os.path.join(dirname, "state.json"),
            log_path=os.path.join(dirname, "events.jsonl"))
        self.policy = policy
        self.fc = FakeMgmtBlock()
        self.agent = FakeHostAgent(self.fc, **agent)
        self.model = model
        self.fw = self._firmware()
        self.pushed: list[int] = []
        self.restarts = 0

    def _firmware(self):
        return Firmware(Card(self.fc.card_port), self.policy, sleep=lambda s: None)

    def restart(self):
        """The firmware process died: a new one on the same card and state file."""
        self.fw.close()
        self.fw = self._firmware()
        self.restarts += 1

    def set_load(self, **base):
        u = {r: base.get(r, 10) for r in RES}
        if self.model:
            for t in self.policy.tasks:
                if self.fc.owners[t.index] == Owner.CARD:
                    for r in RES:
                        u[r] += t.cost[r]
        self.fc.set_util(**{r: min(100, int(v)) for r, v in u.items()})

    def push(self):
        for t in self.policy.tasks:
            word = NOOP_REQ << 24 | t.index << 16 | (len(self.pushed) & 0xFFFF)
            if self.fc.push(t.index, word):
                self.pushed.append(word)

    def poll(self, push=True, **base):
        """Push a request per task, set the load, poll once, let card time pass, check."""
        if push:
            self.push()
        self.set_load(**base)
        self.fw.poll_once()
        self.fc.advance(self.POLL_CYCLES)
        self.check()

    def check(self):
        fc, fw = self.fc, self.fw
        assert all(o in (Owner.CARD, Owner.HOST) for o in fc.owners)
        want = {t.name: OWNER_NAME[fc.owners[t.index]] for t in self.policy.tasks}
        assert fw.placement == want
        assert fw.engine.placement == want
        for t in self.policy.tasks:
            if fc.owners[t.index] == Owner.HOST:
                assert t.index in self.agent.running, f"host owns {t.name} with no VM"
        assert fc.pop_denied_by["card"] == 0 and fc.owner_refused == 0
        # moves surviving a poll: card->host waiting for READY, host->card waiting for STOPPED
        for rec in fw.state.moves.values():
            assert (rec.to, rec.phase) in ((HOST, "stopping_card"), (CARD, "stopping_host"))

    def events(self, kind=None):
        with open(self.policy.log_path) as f:
            evs = [json.loads(line) for line in f if line.strip()]
        return [e for e in evs if kind is None or e["event"] == kind]

    def drain(self, polls=60, **base):
        for _ in range(polls):
            self.poll(push=False, **base)
            if not any(self.fc.fifos) and not self.fw.state.moves:
                return
        raise AssertionError(f"not drained: {[len(f) for f in self.fc.fifos]} "
                             f"{self.fw.state.moves}")

    def check_exactly_once(self):
        """Every pushed request was popped exactly once, by the owner at that time; the card's
        log agrees with the card's pop record."""
        assert not any(self.fc.fifos)
        card_log = [(e["index"], e["req"]) for e in self.events("request_served")]
        card_pops = [(t, w) for side, t, w in self.fc.pop_log if side == "card"]
        assert card_log == card_pops
        served = [w for _, w in card_pops] + [w for _, w in self.agent.served]
        assert sorted(served) == sorted(self.pushed)
        assert len(set(served)) == len(served)
        assert all(e["by"] == "card" for e in self.events("request_served"))


# State saves rename a file; on a disk that flushes on rename that costs ~2 ms each, so the
# rigs keep their files on tmpfs when there is one.
FAST_DIR = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


@pytest.fixture
def rig_dir():
    with tempfile.TemporaryDirectory(prefix="fwtest-", dir=FAST_DIR) as d:
        yield d


@pytest.fixture(autouse=True)
def no_fsync(monkeypatch):
    """A simulated crash kills the process, not the machine: skip the (slow) fsyncs."""
    monkeypatch.setattr(StateStore, "durable", False)


def moves(rig, to=None):
    return [(e["task"], e["to"]) for e in rig.events("move_done") if to in (None, e["to"])]


# -- moves under a stream of requests ---------------------------------------------------------
@pytest.mark.parametrize("delay", [0, 2000, 9000])
def test_moves_out_and_back_lose_no_request(rig_dir, delay):
    rig = Rig(rig_dir, ready_delay_cycles=delay)
    schedule = ([dict(processor=40)] * 15 + [dict(processor=60)] * 30     # 78: mon leaves
                + [dict(processor=40)] * 40                               # back after dwell
                + [dict(processor=90, network=75)] * 30                   # everyone leaves
                + [dict(processor=30)] * 60)                              # all come back
    for base in schedule:
        rig.poll(**base)
    rig.drain(processor=30)
    rig.check_exactly_once()
    done = moves(rig)
    assert done[0] == ("mon", HOST) and done[1] == ("mon", CARD)
    assert {t for t, to in done[2:] if to == HOST} == {"qos", "mon", "log"}
    assert [to for t, to in done if t == "qos"] == [HOST, CARD]
    assert rig.fw.placement == {"qos": CARD, "mon": CARD, "log": CARD}
    assert len(rig.agent.served) > 0 and len(rig.pushed) > 300
    assert not rig.events("move_rollback") and not rig.events("error")


def test_card_stops_popping_before_the_handover(rig_dir):
    """Between START and the flip nobody pops the moving task: its requests wait in the card
    FIFO and the host VM serves them after the flip."""
    rig = Rig(rig_dir, tasks=("mon",), ready_delay_cycles=6 * Rig.POLL_CYCLES)
    rig.poll(processor=40)
    rig.poll(processor=80)                       # 85 > 75: the move starts
    assert rig.fw.state.moves["mon"].phase == "stopping_card"
    popped = len(rig.fc.pop_log)
    for _ in range(4):
        rig.poll(processor=80)
        assert len(rig.fc.pop_log) == popped     # queued, not served
    assert len(rig.fc.fifos[1]) >= 4
    rig.drain(processor=80)
    assert rig.fw.placement == {"mon": HOST}
    assert rig.fc.fifos[1] == type(rig.fc.fifos[1])()
    rig.check_exactly_once()


def test_refused_rolls_back_and_retries_after_dwell(rig_dir):
    rig = Rig(rig_dir, tasks=("mon",), refuse=True, dwell=100.0)
    for _ in range(12):
        rig.poll(processor=80)
    rb = rig.events("move_rollback")
    assert rb and all(e["reason"] == "refused" for e in rb)
    begins = [e["t_us"] for e in rig.events("move_begin")]
    assert len(begins) >= 2 and all(b - a >= 100.0 for a, b in zip(begins, begins[1:]))
    assert rig.fc.owners[1] == Owner.CARD and rig.fw.placement == {"mon": CARD}
    assert rig.agent.messages.count((STOP, 1)) == len(rb)
    rig.drain(processor=80)
    rig.check_exactly_once()


def test_no_ready_times_out_and_rolls_back(rig_dir):
    rig = Rig(rig_dir, tasks=("mon",), silent=True, handoff=150.0, dwell=1000.0)
    for _ in range(12):
        rig.poll(processor=80)
    (rb,) = rig.events("move_rollback")
    (begin,) = rig.events("move_begin")
    assert rb["reason"] == "timeout" and 150.0 <= rb["t_us"] - begin["t_us"] < 200.0
    assert rig.agent.messages == [(START, 1), (STOP, 1)]
    assert rig.fw.placement == {"mon": CARD}
    assert rig.fw.engine.pending == {}
    rig.agent.silent = False                 # a late READY after the rollback is ignored
    rig.fc.host_port.write(R.MBOX_H2C, encode_msg(READY, 1))
    rig.poll(processor=80)
    assert rig.fc.owners[1] == Owner.CARD
    assert rig.events("error")[-1]["message"].startswith("READY without a move")
    rig.drain(processor=40)
    rig.check_exactly_once()


def test_missing_stopped_is_only_logged(rig_dir):
    rig = Rig(rig_dir, tasks=("mon",), dwell=0.0)
    rig.poll(processor=80)
    rig.poll(processor=80)
    assert rig.fw.placement == {"mon": HOST}
    rig.agent.detach()                       # the host agent hangs
    rig.poll(processor=40)
    assert rig.fw.placement == {"mon": CARD}
    for _ in range(20):
        rig.poll(processor=40, push=False)
    assert rig.events("error")[-1]["message"] == "no STOPPED from the host agent"
    assert rig.events("move_done")[-1]["stopped"] is False and not rig.fw.state.moves


def test_flapping_load_on_the_card(rig_dir):
    """UTIL crossing the threshold every poll: one move out, none back (dwell 100 µs > the
    20 µs between polls); then the load settles and exactly one move back follows the dwell."""
    rig = Rig(rig_dir, tasks=("mon",), dwell=100.0, model=False)
    for i in range(60):
        rig.poll(processor=90 if i % 2 == 0 else 50)
    assert moves(rig) == [("mon", HOST)]
    t_calm = None
    for _ in range(20):
        rig.poll(processor=50)
        t_calm = t_calm if t_calm is not None else rig.events("util_sample")[-1]["t_us"]
    assert moves(rig) == [("mon", HOST), ("mon", CARD)]
    assert rig.events("move_begin")[-1]["t_us"] - t_calm >= 100.0
    rig.drain(processor=50)
    rig.check_exactly_once()


def test_qos_from_policy_and_from_requests(rig_dir):
    rig = Rig(rig_dir, tasks=("qos",))
    rig.fw.policy = dataclasses.replace(rig.policy, qos=(
        parse_policy(POLICY.format(strategy="fit", dwell=1, handoff=1)
                     + "[[qos]]\nfunction = 2\nrate_bytes_per_clock = 1.25\nburst = 100\n").qos))
    rig.poll(processor=40)
    assert rig.fc.qos[2] == [320, 100]
    word = 0x01 << 24 | 9 << 16 | 384                      # QOS_SET function 9, 1.5 B/clk
    assert rig.fc.push(0, word)
    rig.pushed.append(word)
    rig.poll(processor=40, push=False)
    assert rig.fc.qos[9] == [384, rig.policy.qos_burst]
    sets = rig.events("qos_set")
    assert [(e["function"], e["rate_reg"], e["source"]) for e in sets] == [(2, 320, "policy"),
                                                                          (9, 384, "qos")]
    rig.check_exactly_once()


def test_restart_takes_placement_from_the_card(rig_dir):
    rig = Rig(rig_dir, tasks=("qos", "mon"))
    rig.agent.running.add(1)
    rig.fc.owners[1] = Owner.HOST           # e.g. the state file was lost
    rig.poll(processor=40, model=False)
    assert rig.fw.placement == {"qos": CARD, "mon": HOST}
    os.unlink(rig.policy.state_path)
    rig.restart()
    rig.poll(processor=75)
    assert rig.fw.placement == {"qos": CARD, "mon": HOST}
    state = json.load(open(rig.policy.state_path))
    assert state["placement"] == {"qos": CARD, "mon": HOST}


# -- restarts ----------------------------------------------------------------------------------
@pytest.mark.parametrize("to,phase,owner,after,placement,sent", [
    (HOST, "stopping_card", Owner.CARD, Owner.CARD, CARD, [STOP]),   # roll back
    (HOST, "stopping_card", Owner.HOST, Owner.HOST, HOST, []),       # already flipped
    (HOST, "flip", Owner.CARD, Owner.HOST, HOST, []),                # roll forward
    (HOST, "flip", Owner.HOST, Owner.HOST, HOST, []),                # finish bookkeeping
    (CARD, "starting_card", Owner.HOST, Owner.HOST, HOST, []),       # roll back
    (CARD, "flip", Owner.HOST, Owner.CARD, CARD, [STOP]),            # roll forward
    (CARD, "flip", Owner.CARD, Owner.CARD, CARD, [STOP]),            # finish, STOP again
    (CARD, "stopping_host", Owner.CARD, Owner.CARD, CARD, [STOP]),   # STOP again
])
def test_recover_each_phase(tmp_path, to, phase, owner, after, placement, sent):
    fc = FakeMgmtBlock()
    fc.owners[2] = owner
    store = StateStore(str(tmp_path / "s.json"))
    state = FirmwareState(placement={"t": HOST if to == CARD else CARD},
                          moves={"t": MoveRecord("t", 2, to, phase, 0.0, 100.0)})
    store.save(state)
    state = recover(store.load(), Card(fc.card_port), store=store, now_us=50.0)
    assert fc.owners[2] == after
    assert state.placement == {"t": placement}
    assert [decode_msg(w)[:2] for w in fc.c2h] == [(op, 2) for op in sent]
    left = list(state.moves.values())
    assert left == ([MoveRecord("t", 2, CARD, "stopping_host", 0.0, 50.0 + 10_000.0)]
                    if placement == CARD and to == CARD else [])
    assert store.load() == state
    assert len(fc.owner_log) == (after != owner)       # at most the one flip write


def _skip_pop_reads(side, kind, addr, value):
    """A pop whose reply is lost on the link is a lost request: the hardware's read-to-pop
    cannot help it, so the after-effect crashes skip those reads."""
    return kind == "r" and R.REQ_POP <= addr < R.REQ_POP + 4 * R.TASKS


def _crash_scenario(dirname, to, n, after):
    """Move "mon" (to the host, or back to the card) under a request stream; crash the
    firmware at card access ``n`` (counted from the load change) and restart it on the same
    card and state file. Returns the rig, the phases in flight at the crash (None: no crash),
    and the range of accesses (relative) of the polls during which the move was under way."""
    rig = Rig(dirname, tasks=("qos", "mon"), dwell=60.0, handoff=300.0,
              ready_delay_cycles=1500)
    hot, cool = dict(processor=62), dict(processor=40)         # 62+15=77: mon leaves
    for _ in range(3):
        rig.poll(**cool)
    if to == CARD:
        for _ in range(4):
            rig.poll(**hot)
        assert rig.fw.placement == {"qos": CARD, "mon": HOST}
    load = cool if to == CARD else hot
    if n is not None:
        rig.fc.crash_at(n, after=after, skip=_skip_pop_reads if after else None)
    base = rig.fc.accesses["card"]
    begins = len(rig.events("move_begin"))
    crash_phases, window = None, []
    for i in range(40):
        before = rig.fc.accesses["card"] - base
        try:
            rig.poll(push=i < 12, **load)
        except CardCrash:
            assert crash_phases is None
            saved = json.load(open(rig.policy.state_path))
            crash_phases = sorted(m["phase"] for m in saved["moves"].values())
            rig.restart()
            rig.poll(push=False, **load)         # start(): recover; then the checks
        if rig.fw.state.moves or (len(rig.events("move_begin")) > begins and not window):
            window = window or [before]
        elif window and len(window) == 1:
            window.append(rig.fc.accesses["card"] - base)
        if i >= 12 and not any(rig.fc.fifos) and not rig.fw.state.moves:
            break
    return rig, crash_phases, window


@pytest.mark.parametrize("after", [False, True], ids=["before-effect", "after-effect"])
@pytest.mark.parametrize("to", [HOST, CARD])
def test_crash_at_every_access_of_a_move(rig_dir, to, after):
    """Crash the firmware at each card access of the polls that carry a move, in turn, and
    restart it on the same card and state file: one owner after every poll, the move ends
    finished (or rolled back and retried, as the load persists), no request lost or served
    twice, and every phase of the move was hit by some crash."""
    tmp_path = Path(rig_dir)
    (tmp_path / "ref").mkdir()
    ref, crash, window = _crash_scenario(str(tmp_path / "ref"), to, None, after)
    want = {"qos": CARD, "mon": to}
    assert crash is None and ref.fw.placement == want and len(window) == 2
    phases_hit = set()
    for n in range(window[0], window[1]):
        d = tmp_path / f"{n}"
        d.mkdir()
        rig, crash, _ = _crash_scenario(str(d), to, n, after)
        assert crash is not None or rig.fc.crash_skipped, n
        phases_hit.update(crash or ())
        assert rig.fw.placement == want, n
        assert not rig.fw.state.moves, n
        assert [OWNER_NAME[o] for o in rig.fc.owners[:2]] == [CARD, to]
        assert rig.agent.running == ({1} if to == HOST else set()), n
        rig.check_exactly_once()
    assert phases_hit == {HOST: {"stopping_card", "flip"},
                          CARD: {"starting_card", "flip", "stopping_host"}}[to]


# -- the property ------------------------------------------------------------------------------
LOAD = st.integers(0, 100) | st.sampled_from([69, 70, 71, 74, 75, 76, 80, 81, 85, 86])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(loads=st.lists(st.tuples(LOAD, LOAD, LOAD, LOAD), min_size=1, max_size=40),
       strategy=st.sampled_from(["priority", "fit"]),
       delay=st.sampled_from([0, 1000, 5000, 60_000]),
       refuse=st.booleans(), dwell=st.sampled_from([0.0, 40.0, 200.0]))
def test_property_one_owner_and_placement_matches_card(loads, strategy, delay, refuse, dwell):
    with tempfile.TemporaryDirectory(prefix="fwtest-", dir=FAST_DIR) as d:
        rig = Rig(d, strategy=strategy, dwell=dwell, model=False, ready_delay_cycles=delay,
                  refuse=refuse and delay == 0)
        for load in loads:
            rig.poll(**dict(zip(RES, load)))          # Rig.check runs after every poll
        rig.drain(processor=10)
        rig.check_exactly_once()
        rig.fw.close()
