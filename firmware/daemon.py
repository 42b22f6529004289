"""The firmware main loop: sample, decide, move, serve, log.

One :meth:`Firmware.poll_once`:

1. read the card time and the four utilisation inputs (logged when they change, plus a
   ``threshold_crossed`` event per resource that crosses its threshold);
2. take the host agent's mailbox words (READY, REFUSED, STOPPED) to the mover;
3. let the mover time out waits;
4. ask the placement engine for moves and start them (skipped when a move took effect during
   this poll: the sample still carries the moved task's load);
5. serve the requests of every task the card owns (the card-side management VMs): pop its FIFO
   until empty (at most ``REQ_DEPTH`` per poll), log ``request_served``; a ``QOS_SET`` request
   programs the function's rate limit.

:meth:`Firmware.start` (called by the first poll) loads the state, resolves moves left in flight
by a restart (:meth:`firmware.mover.Mover.recover`), takes placement from the card's owner
registers, and programs the policy's ``[[qos]]`` limits.
"""

from __future__ import annotations

import time
from typing import Callable

from regmap import MgmtBlockRegs, MgmtRegs, Owner

from .card import RESOURCES, REQ_QOS_SET, Card, CardError, decode_msg
from .eventlog import EventLog
from .mover import Mover
from .placement import CARD, HOST, Move, PlacementEngine
from .policy import Policy
from .state import FirmwareState, StateStore

__all__ = ["Firmware"]


class Firmware:
    """The firmware for ``card`` under ``policy``.

    ``clock`` returns the current time in microseconds (default: the card's cycle counter over
    ``policy.clock_mhz``); ``sleep`` waits that many seconds between polls (default
    :func:`time.sleep`). State and log paths come from the policy.
    """

    def __init__(self, card: Card, policy: Policy, clock: Callable[[], float] | None = None, *,
                 sleep: Callable[[float], None] | None = None):
        self.card = card
        self.policy = policy
        self.clock = clock or (lambda: card.cycles() / policy.clock_mhz)
        self.sleep = sleep or time.sleep
        self.index = {t.name: t.index for t in policy.tasks}
        self.store = StateStore(policy.state_path)
        self.state: FirmwareState | None = None
        self.log: EventLog | None = None
        self.engine: PlacementEngine | None = None
        self.mover: Mover | None = None
        self.polls = 0
        self.served = 0
        self.stop_requested = False   # set (e.g. by a signal handler): run() returns after the poll
        self._stale = False         # a move took effect after this poll's UTIL sample
        self._above: dict[str, bool] = {}
        self._next_status: float | None = None

    # -- life cycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Load state, recover moves in flight, sync placement with the card, program QoS."""
        if self.engine is not None:
            return
        self.state = self.store.load()
        if self.log is None:
            self.log = EventLog(self.policy.log_path, seq=self.state.seq)
        now = self.clock()
        self.log.emit(now, "start", policy=self.policy.source, strategy=self.policy.strategy,
                      tasks=dict(self.index), moves_in_flight=sorted(self.state.moves))
        # a move of a task the policy no longer names is still resolved, by its index
        tasks = dict(self.index) | {r.task: r.index for r in self.state.moves.values()}
        mover = Mover(self.card, self.state, tasks, store=self.store, log=self.log,
                      handoff_timeout_us=self.policy.handoff_timeout_us,
                      stop_timeout_us=self.policy.stop_timeout_us)
        mover.recover(now)
        self._sync_placement(now)
        # the only moves left are host-to-card ones waiting for STOPPED: already committed
        engine = PlacementEngine(self.policy, self.state.placement)
        mover.on_commit = self._committed
        mover.on_abort = engine.abort
        self.mover, self.engine = mover, engine
        for q in self.policy.qos:
            self._set_qos(now, q.function, q.rate_bytes_per_clock, q.burst, source="policy")

    def _committed(self, move: Move) -> None:
        self.engine.commit(move)
        self._stale = True

    def _sync_placement(self, now: float) -> None:
        """Placement = the card's owner registers, the only truth after a restart."""
        changed = False
        for name, index in self.index.items():
            owner = self.card.owner(index)
            where = {Owner.CARD: CARD, Owner.HOST: HOST}.get(owner)
            if where is None:
                raise CardError(f"task {index}: owner register reads {owner}")
            saved = self.state.placement.get(name)
            if saved != where:
                if saved is not None:
                    self.log.emit(now, "error", task=name, index=index,
                                  message=f"state says {saved}, owner register says {where}")
                self.state.placement[name] = where
                changed = True
        for name in list(self.state.placement):
            if name not in self.index:
                del self.state.placement[name]
                changed = True
        if changed:
            self.state.seq = self.log.seq
            self.store.save(self.state)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()

    def __enter__(self) -> "Firmware":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def placement(self) -> dict[str, str]:
        """Where each task runs now (committed moves only)."""
        return dict(self.state.placement) if self.state else {}

    # -- the loop -------------------------------------------------------------------------
    def poll_once(self) -> float:
        """One round of the loop; returns the card time (µs) it sampled."""
        self.start()
        assert self.log and self.mover and self.engine
        now = self.clock()
        util = self.card.util()
        self._stale = False
        self._sample(now, util)
        for _ in range(MgmtBlockRegs.MBOX_DEPTH):
            word = self.card.mbox_recv()
            if word is None:
                break
            op, task, _arg = decode_msg(word)
            self._guard(now, lambda: self.mover.on_message(op, task, now))
        self._guard(now, lambda: self.mover.tick(now))
        if not self._stale:         # else the sample still holds the load of a moved task
            for move in self.engine.step(now, util):
                self._guard(now, lambda: self.mover.begin(move, now), move)
        self._serve(now)
        if self._next_status is None or now >= self._next_status:
            self._guard(now, lambda: self._status(now))
            self._next_status = now + self.policy.status_every_us
        self.polls += 1
        return now

    def run(self, stop_after_us: float | None = None, max_polls: int | None = None) -> int:
        """Poll until ``stop_after_us`` of card time passed or ``max_polls`` polls were made
        (forever if neither); returns the number of polls."""
        first = None
        polls = 0
        while True:
            now = self.poll_once()
            first = now if first is None else first
            polls += 1
            if max_polls is not None and polls >= max_polls:
                return polls
            if stop_after_us is not None and now - first >= stop_after_us:
                return polls
            if self.stop_requested:
                return polls
            self.sleep(self.policy.poll_us * 1e-6)

    def _guard(self, now: float, action: Callable[[], None], move: Move | None = None) -> None:
        """Run a mover action; a card error (not a link error) is logged, and a move that
        did not start is handed back to the engine."""
        try:
            action()
        except CardError as e:
            self.log.emit(now, "error", message=str(e))
            if move is not None and move.task not in self.state.moves:
                self.engine.abort(move, now)

    def _sample(self, now: float, util: dict[str, int]) -> None:
        self.log.util_sample(now, util)
        th = self.policy.thresholds
        for r in RESOURCES:
            above = util[r] > th[r]
            if above != self._above.get(r, False):
                self.log.emit(now, "threshold_crossed", resource=r, value=util[r],
                              threshold=th[r], above=above)
            self._above[r] = above

    # -- status monitoring -----------------------------------------------------------------
    def status(self) -> dict:
        """The card's health and the traffic of the policy's ``[status]`` functions."""
        return {"placement": self.placement,
                "uart_errors": self.card.read(MgmtBlockRegs.UART_ERRORS),
                "pcie_malformed": self.card.read(MgmtRegs.ERR_MALFORMED),
                "pcie_unsupported": self.card.read(MgmtRegs.ERR_UNSUPPORTED),
                "functions": {str(f): self.card.telemetry(f)
                              for f in self.policy.status_functions}}

    def _status(self, now: float) -> None:
        self.log.emit(now, "status", **self.status())

    # -- the card-side management VMs --------------------------------------------------------
    def _serve(self, now: float) -> None:
        for name, index in self.index.items():
            if not self.mover.card_serves(name):
                continue
            for _ in range(MgmtBlockRegs.REQ_DEPTH):
                word = self.card.pop(index)
                if word is None:
                    break
                self.served += 1
                self.log.emit(now, "request_served", task=name, index=index, req=word, by="card")
                self._handle_request(now, name, word)

    def _handle_request(self, now: float, task: str, word: int) -> None:
        op = (word >> 24) & 0x7F
        if op == REQ_QOS_SET:
            fidx, units = (word >> 16) & 0xFF, word & 0xFFFF
            self._set_qos(now, fidx, units / 256, self.policy.qos_burst, source=task)

    def _set_qos(self, now: float, fidx: int, rate: float, burst: int, source: str) -> None:
        try:
            units = self.card.set_qos(fidx, rate, burst)
        except (CardError, ValueError) as e:
            self.log.emit(now, "error", function=fidx, message=f"QoS not set: {e}")
            return
        self.log.emit(now, "qos_set", function=fidx, rate_bytes_per_clock=units / 256,
                      rate_reg=units, burst=burst, source=source)
