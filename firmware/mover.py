"""Moving a management task between the card and the host, crash-safe.

A move is a small state machine persisted in :class:`firmware.state.FirmwareState`; each phase
is saved *before* the action it names, so a restarted firmware can finish or undo it
(:func:`recover`). The only ownership change is one ``OWNER`` register write
(:meth:`Card.set_owner`): the hardware has exactly one owner at every instant, and requests
wait in the card's FIFO while nobody pops them, so none is lost or served twice.

Card to host::

    stopping_card   the card stops serving the task (its requests queue in the card FIFO);
                    START(task) goes to the host agent; wait for READY(task)
                    (REFUSED or no READY by the deadline: roll back, send STOP, card keeps it)
    flip            set_owner(task, HOST); the host VM now pops the queued requests
    (done)          record removed, placement = host

Host to card::

    starting_card   the card side gets ready to serve the task (checks the owner register)
    flip            set_owner(task, CARD); the card serves the task from now on
    stopping_host   STOP(task) to the host agent; wait for STOPPED (a timeout is only logged)
    (done)          record removed

The engine learns of a finished move at the flip (``on_commit``) and of a rolled-back one
(``on_abort``). Several tasks may move at once; each task has at most one move.
"""

from __future__ import annotations

from typing import Callable

from regmap import Owner

from .card import Card, OP_NAMES, READY, REFUSED, START, STOP, STOPPED, encode_msg
from .eventlog import EventLog
from .placement import CARD, HOST, Move
from .state import FirmwareState, MoveRecord, StateStore

__all__ = ["Mover", "recover"]

_OWNER = {CARD: Owner.CARD, HOST: Owner.HOST}


class Mover:
    """Runs the moves of ``state`` through ``card``, saving to ``store`` and logging to ``log``.

    ``tasks`` maps task names to card task indices.
    """

    def __init__(self, card: Card, state: FirmwareState, tasks: dict[str, int], *,
                 store: StateStore | None = None, log: EventLog | None = None,
                 handoff_timeout_us: float = 10_000.0, stop_timeout_us: float = 10_000.0,
                 on_commit: Callable[[Move], None] | None = None,
                 on_abort: Callable[[Move, float], None] | None = None):
        self.card = card
        self.state = state
        self.tasks = tasks
        self.store = store
        self.log = log if log is not None else EventLog(None)
        self.handoff_timeout_us = handoff_timeout_us
        self.stop_timeout_us = stop_timeout_us
        self.on_commit = on_commit or (lambda move: None)
        self.on_abort = on_abort or (lambda move, now_us: None)

    # -- queries --------------------------------------------------------------------------
    def record(self, task: str) -> MoveRecord | None:
        return self.state.moves.get(task)

    def card_serves(self, task: str) -> bool:
        """True when the card side should pop ``task``'s requests: it owns the task and is
        not handing it to the host."""
        rec = self.state.moves.get(task)
        return self.state.placement.get(task) == CARD and not (rec and rec.to == HOST)

    # -- persistence ----------------------------------------------------------------------
    def _save(self) -> None:
        if self.store is not None:
            self.state.seq = self.log.seq
            self.store.save(self.state)

    def _phase(self, rec: MoveRecord, phase: str, now_us: float, **fields) -> None:
        rec.phase = phase
        self._save()
        self.log.emit(now_us, "move_phase", task=rec.task, index=rec.index, to=rec.to,
                      phase=phase, **fields)

    def _send(self, op: int, index: int) -> None:
        self.card.mbox_send(encode_msg(op, index))

    # -- starting a move ------------------------------------------------------------------
    def begin(self, move: Move, now_us: float) -> None:
        """Start ``move``; a host-to-card move runs up to its flip at once."""
        old = self.state.moves.get(move.task)
        if old is not None:
            if not (old.phase == "stopping_host" and move.to == HOST):
                raise RuntimeError(f"task {move.task!r} is already moving ({old.to}, {old.phase})")
            self._finish(old, now_us, stopped=False, note="superseded by a new move")
        index = self.tasks[move.task]
        if move.to == HOST:
            rec = MoveRecord(move.task, index, HOST, "stopping_card", now_us,
                             now_us + self.handoff_timeout_us)
            self.state.moves[move.task] = rec
            self._save()
            self.log.emit(now_us, "move_begin", task=rec.task, index=index, to=HOST,
                          phase=rec.phase)
            self._send(START, index)
        else:
            rec = MoveRecord(move.task, index, CARD, "starting_card", now_us,
                             now_us + self.stop_timeout_us)
            self.state.moves[move.task] = rec
            self._save()
            self.log.emit(now_us, "move_begin", task=rec.task, index=index, to=CARD,
                          phase=rec.phase)
            owner = self.card.owner(index)
            if owner != Owner.HOST:
                self.log.emit(now_us, "error", task=rec.task, index=index,
                              message=f"owner register is {owner} before the move to the card")
            self._flip(rec, now_us)

    # -- the handover ---------------------------------------------------------------------
    def _flip(self, rec: MoveRecord, now_us: float, **fields) -> None:
        self._phase(rec, "flip", now_us, **fields)
        self.card.set_owner(rec.index, _OWNER[rec.to])
        self._flipped(rec, now_us, **fields)

    def _flipped(self, rec: MoveRecord, now_us: float, **fields) -> None:
        """The owner register holds the target: the move has taken effect."""
        self.state.placement[rec.task] = rec.to
        if rec.to == HOST:
            del self.state.moves[rec.task]
            self._save()
            self.log.emit(now_us, "move_done", task=rec.task, index=rec.index, to=HOST,
                          took_us=round(now_us - rec.since_us, 3), **fields)
        else:
            rec.deadline_us = now_us + self.stop_timeout_us
            self._phase(rec, "stopping_host", now_us, **fields)
        self.on_commit(Move(rec.task, rec.to))
        if rec.to == CARD:
            self._send(STOP, rec.index)

    def _finish(self, rec: MoveRecord, now_us: float, *, stopped: bool, note: str = "") -> None:
        del self.state.moves[rec.task]
        self._save()
        fields = {"stopped": stopped} | ({"note": note} if note else {})
        self.log.emit(now_us, "move_done", task=rec.task, index=rec.index, to=CARD,
                      took_us=round(now_us - rec.since_us, 3), **fields)

    def _rollback(self, rec: MoveRecord, now_us: float, reason: str) -> None:
        """Undo a card-to-host move before its flip: STOP the host VM, the card keeps it."""
        self._send(STOP, rec.index)      # first: a crash before the save repeats it, harmlessly
        del self.state.moves[rec.task]
        self.state.placement[rec.task] = CARD
        self._save()
        self.log.emit(now_us, "move_rollback", task=rec.task, index=rec.index, to=HOST,
                      reason=reason)
        self.on_abort(Move(rec.task, HOST), now_us)

    # -- events ---------------------------------------------------------------------------
    def on_message(self, op: int, index: int, now_us: float) -> None:
        """A mailbox word from the host agent."""
        rec = next((r for r in self.state.moves.values() if r.index == index), None)
        if op == READY:
            if rec is not None and rec.to == HOST and rec.phase == "stopping_card":
                self._flip(rec, now_us)
            else:
                self.log.emit(now_us, "error", index=index,
                              message="READY without a move to the host waiting for it")
        elif op == REFUSED:
            if rec is not None and rec.to == HOST and rec.phase == "stopping_card":
                self._rollback(rec, now_us, "refused")
            else:
                self.log.emit(now_us, "error", index=index,
                              message="REFUSED without a move to the host waiting for it")
        elif op == STOPPED:
            if rec is not None and rec.to == CARD and rec.phase == "stopping_host":
                self._finish(rec, now_us, stopped=True)
            # else: the answer to the STOP of a rollback or a recovery: nothing to do
        else:
            self.log.emit(now_us, "error", index=index,
                          message=f"unexpected mailbox op {OP_NAMES.get(op, hex(op))}")

    def tick(self, now_us: float) -> None:
        """Time-outs, and flips that an earlier card error left undone."""
        for rec in list(self.state.moves.values()):
            if rec.phase == "stopping_card" and now_us >= rec.deadline_us:
                self._rollback(rec, now_us, "timeout")
            elif rec.phase in ("starting_card", "flip"):
                self._flip(rec, now_us, retried=True)
            elif rec.phase == "stopping_host" and now_us >= rec.deadline_us:
                self.log.emit(now_us, "error", task=rec.task, index=rec.index,
                              message="no STOPPED from the host agent")
                self._finish(rec, now_us, stopped=False)

    # -- restart --------------------------------------------------------------------------
    def recover(self, now_us: float) -> None:
        """Finish or undo every move the state file says was in flight, from the owner
        registers: target owner already set -> finish; phase flip or later -> do the flip;
        earlier -> roll back (a card-to-host move STOPs the host VM it may have started)."""
        for rec in list(self.state.moves.values()):
            target = _OWNER[rec.to]
            owner = self.card.owner(rec.index)
            if owner == target:
                if rec.phase == "stopping_host":
                    self.state.placement[rec.task] = CARD
                    rec.deadline_us = now_us + self.stop_timeout_us
                    self._save()
                    self._send(STOP, rec.index)
                else:
                    self._flipped(rec, now_us, recovered=True)
            elif rec.phase in ("flip", "stopping_host"):
                self._flip(rec, now_us, recovered=True)
            elif rec.to == HOST:
                self._rollback(rec, now_us, "restart before the flip")
            else:
                del self.state.moves[rec.task]
                self.state.placement[rec.task] = HOST
                self._save()
                self.log.emit(now_us, "move_rollback", task=rec.task, index=rec.index, to=CARD,
                              reason="restart before the flip")


def recover(state: FirmwareState, card: Card, *, store: StateStore | None = None,
            log: EventLog | None = None, now_us: float = 0.0,
            stop_timeout_us: float = 10_000.0) -> FirmwareState:
    """Resolve the moves in flight of ``state`` (loaded after a restart) against ``card``.

    Afterwards every record left is a host-to-card move waiting for STOPPED, with STOP sent
    again. Returns ``state`` (updated in place, and saved to ``store`` if given)."""
    tasks = {rec.task: rec.index for rec in state.moves.values()}
    Mover(card, state, tasks, store=store, log=log,
          stop_timeout_us=stop_timeout_us).recover(now_us)
    return state
