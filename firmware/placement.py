"""Placement decisions: which management task runs on the card and which on the host.

Pure logic, no I/O. Every poll the daemon hands :meth:`PlacementEngine.step` the card time and
the four utilisation inputs; it returns the moves to start. The *board-card condition* is met
when every resource is at or below its threshold.

Condition not met: card-resident tasks are sent to the host, chosen by the strategy, until the
projected utilisation (the sample minus the cost of every card-resident task that is leaving,
moves already under way included) meets the condition, or no task is left on the card.

- ``priority``: lowest priority first (ties: lower task index first).
- ``fit``: the task covering the most of the excess, i.e. the largest
  ``sum(min(cost[r], excess[r]))`` over the resources above threshold, so the fewest tasks move;
  ties: lower priority, then lower index. Tasks that cover nothing still move, lowest priority
  first, while the condition stays unmet.

Condition met: once it has held continuously for ``dwell_us`` (the timer restarts whenever it
is not met, and after every move back), one host-resident task comes back per step, among those
whose cost added to the sample keeps every resource at or below its threshold:

- ``priority``: the highest priority (ties: lower index).
- ``fit``: the largest total cost that fits (the most load back on the card per move);
  ties: higher priority, then lower index.

A task with a move under way (``pending``) gets no other move; nothing comes back while any
move is pending. :meth:`commit` records a finished move, :meth:`abort` one that was rolled back
(the task then waits ``dwell_us`` before it is tried again).
"""

from __future__ import annotations

from dataclasses import dataclass

from .policy import RESOURCES, Policy, TaskPolicy

__all__ = ["Move", "PlacementEngine", "CARD", "HOST"]

CARD = "card"
HOST = "host"


@dataclass(frozen=True)
class Move:
    task: str
    to: str          # CARD or HOST


class PlacementEngine:
    def __init__(self, policy: Policy, placement: dict[str, str] | None = None):
        self.policy = policy
        self.tasks: dict[str, TaskPolicy] = {t.name: t for t in policy.tasks}
        self.placement: dict[str, str] = {name: CARD for name in self.tasks}
        if placement:
            for name, where in placement.items():
                if name in self.placement and where in (CARD, HOST):
                    self.placement[name] = where
        self.pending: dict[str, Move] = {}
        self._met_since: float | None = None
        self._retry_after: dict[str, float] = {}

    # -- the condition --------------------------------------------------------------------
    def condition(self, util: dict[str, float]) -> bool:
        """All four resources at or below their thresholds."""
        th = self.policy.thresholds
        return all(util[r] <= th[r] for r in RESOURCES)

    def excess(self, util: dict[str, float]) -> dict[str, float]:
        """How far each resource is above its threshold (0 when at or below)."""
        th = self.policy.thresholds
        return {r: max(0.0, util[r] - th[r]) for r in RESOURCES}

    # -- decisions ------------------------------------------------------------------------
    def step(self, now_us: float, util: dict[str, float]) -> list[Move]:
        """Moves to start now (each task then stays ``pending`` until commit/abort)."""
        if self.condition(util):
            if self._met_since is None:
                self._met_since = now_us
            moves = self._bring_back(now_us, util)
        else:
            self._met_since = None
            moves = self._shed(now_us, util)
        for m in moves:
            self.pending[m.task] = m
        return moves

    def _eligible(self, name: str, where: str, now_us: float) -> bool:
        return (self.placement[name] == where and name not in self.pending
                and now_us >= self._retry_after.get(name, float("-inf")))

    def _shed(self, now_us: float, util: dict[str, float]) -> list[Move]:
        projected = dict(util)
        for m in self.pending.values():
            if m.to == HOST:
                self._sub(projected, self.tasks[m.task])
        candidates = [self.tasks[n] for n in self.tasks if self._eligible(n, CARD, now_us)]
        moves: list[Move] = []
        while candidates and not self.condition(projected):
            if self.policy.strategy == "priority":
                pick = min(candidates, key=lambda t: (t.priority, t.index))
            else:
                ex = self.excess(projected)
                pick = min(candidates, key=lambda t: (-sum(min(t.cost[r], ex[r]) for r in RESOURCES),
                                                      t.priority, t.index))
            candidates.remove(pick)
            self._sub(projected, pick)
            moves.append(Move(pick.name, HOST))
        return moves

    def _bring_back(self, now_us: float, util: dict[str, float]) -> list[Move]:
        assert self._met_since is not None
        if now_us - self._met_since < self.policy.dwell_us or self.pending:
            return []
        th = self.policy.thresholds
        fits = [self.tasks[n] for n in self.tasks if self._eligible(n, HOST, now_us)
                and all(util[r] + self.tasks[n].cost[r] <= th[r] for r in RESOURCES)]
        if not fits:
            return []
        if self.policy.strategy == "priority":
            pick = min(fits, key=lambda t: (-t.priority, t.index))
        else:
            pick = min(fits, key=lambda t: (-sum(t.cost.values()), -t.priority, t.index))
        self._met_since = now_us           # the next one waits a full dwell again
        return [Move(pick.name, CARD)]

    @staticmethod
    def _sub(util: dict[str, float], task: TaskPolicy) -> None:
        for r in RESOURCES:
            util[r] -= task.cost[r]

    # -- outcomes -------------------------------------------------------------------------
    def commit(self, move: Move) -> None:
        """The move is done: the task now runs where ``move.to`` says."""
        self.placement[move.task] = move.to
        self.pending.pop(move.task, None)

    def abort(self, move: Move, now_us: float) -> None:
        """The move was rolled back: placement unchanged, retry after ``dwell_us``."""
        self.pending.pop(move.task, None)
        self._retry_after[move.task] = now_us + self.policy.dwell_us
