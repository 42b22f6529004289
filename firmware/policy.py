"""The firmware's policy file (TOML) and its validation.

Schema (``firmware/example_policy.toml`` is a commented example)::

    [card]                       # optional
    clock_mhz = 125.0            # card clock: CYCLES / clock_mhz = microseconds (> 0)
    qos_burst = 4096             # bucket depth (bytes) for QOS_SET requests, 0..32767
    [thresholds]                 # required, all four, percent 0..100; a resource AT OR BELOW
    custom_hw = 80               # its threshold meets the board-card condition
    processor = 75
    memory = 85
    network = 70
    [placement]                  # required
    strategy = "priority"        # "priority" or "fit"
    dwell_us = 200.0             # the condition must hold this long (card time) before a
                                 # task moves back to the card (>= 0)
    poll_us = 20.0               # optional, pause between polls (> 0)
    handoff_timeout_us = 10000.0 # optional, wait for READY before a card->host move rolls back
    stop_timeout_us = 10000.0    # optional, wait for STOPPED after a host->card move
    [[task]]                     # required, 1..4 of them: one management VM each
    name = "qos"                 # unique, non-empty
    index = 0                    # card task index 0..3, unique
    priority = 3                 # optional (0), integer; higher = keep on the card longer
    cost = { custom_hw = 5, processor = 10, memory = 5, network = 0 }
                                 # optional (all 0): percent points it adds on the card
    [[qos]]                      # optional: rate limits programmed at start
    function = 1                 # 0..255, unique
    rate_bytes_per_clock = 0.5   # 0 = unlimited, else 1/256 .. 255.996
    burst = 4096                 # bytes, 0..32767
    [log]
    path = "firmware-events.jsonl"   # optional (this default); relative to the working directory
    [state]
    path = "firmware-state.json"     # optional (this default)

Unknown keys anywhere are errors. :class:`PolicyError` says in one line which file, which key
and what is wrong. Booleans are not numbers.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from typing import Any

from regmap import MgmtBlockRegs

from .card import RESOURCES, qos_rate_units

__all__ = ["Policy", "TaskPolicy", "QosPolicy", "PolicyError", "load_policy", "parse_policy",
           "RESOURCES", "STRATEGIES"]

STRATEGIES = ("priority", "fit")


class PolicyError(Exception):
    """An invalid policy; ``str()`` is one line: file, key, problem."""


@dataclass(frozen=True)
class TaskPolicy:
    name: str
    index: int
    priority: int = 0
    cost: dict[str, float] = field(default_factory=lambda: dict.fromkeys(RESOURCES, 0))


@dataclass(frozen=True)
class QosPolicy:
    function: int
    rate_bytes_per_clock: float
    burst: int


@dataclass(frozen=True)
class Policy:
    thresholds: dict[str, float]
    tasks: tuple[TaskPolicy, ...]
    strategy: str = "priority"
    dwell_us: float = 200.0
    poll_us: float = 20.0
    handoff_timeout_us: float = 10_000.0
    stop_timeout_us: float = 10_000.0
    clock_mhz: float = 125.0
    qos_burst: int = 4096
    qos: tuple[QosPolicy, ...] = ()
    log_path: str = "firmware-events.jsonl"
    state_path: str = "firmware-state.json"
    status_every_us: float = 1000.0
    status_functions: tuple[int, ...] = (0,)
    source: str = "<policy>"

    def task(self, name: str) -> TaskPolicy:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)


def load_policy(path: str) -> Policy:
    """Read and validate the policy file at ``path``."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise PolicyError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PolicyError(f"{path}: not UTF-8 text: {e.reason} at byte {e.start}") from None
    return parse_policy(text, source=str(path))


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Validate policy TOML ``text``; ``source`` names it in errors."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"{source}: bad TOML: {_one_line(str(e))}") from None
    return _Parser(source).policy(doc)


def _one_line(s: str) -> str:
    return " ".join(s.split())


class _Parser:
    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, problem: str) -> PolicyError:
        return PolicyError(_one_line(f"{self.source}: {key}: {problem}"))

    # -- generic checks -------------------------------------------------------------------
    def table(self, doc: dict, key: str, allowed: tuple[str, ...], required: bool,
              where: str | None = None) -> dict:
        where = where or key
        value = doc.get(key)
        if value is None:
            if required:
                raise self.fail(where, "missing required section")
            return {}
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a table, got {_kind(value)}")
        self.known(value, allowed, where)
        return value

    def known(self, table: dict, allowed: tuple[str, ...], where: str) -> None:
        for k in table:
            if k not in allowed:
                raise self.fail(f"{where}.{k}" if where else k,
                                f"unknown key (allowed: {', '.join(allowed)})")

    def number(self, table: dict, key: str, where: str, *, default: float | None = None,
               lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
        path = f"{where}.{key}"
        if key not in table:
            if default is None:
                raise self.fail(path, "missing required key")
            return default
        v = table[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.fail(path, f"must be a number, got {_kind(v)} {_show(v)}")
        if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
            lo_s = "" if lo is None else (f"> {lo:g}" if lo_open else f">= {lo:g}")
            hi_s = "" if hi is None else f"<= {hi:g}"
            raise self.fail(path, f"must be {' and '.join(s for s in (lo_s, hi_s) if s)}, got {v:g}")
        return v

    def integer(self, table: dict, key: str, where: str, *, default: int | None = None,
                lo: int | None = None, hi: int | None = None) -> int:
        path = f"{where}.{key}"
        if key not in table:
            if default is None:
                raise self.fail(path, "missing required key")
            return default
        v = table[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(path, f"must be an integer, got {_kind(v)} {_show(v)}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise self.fail(path, f"must be in {lo}..{hi}, got {v}")
        return v

    def string(self, table: dict, key: str, where: str, *, default: str | None = None) -> str:
        path = f"{where}.{key}"
        if key not in table:
            if default is None:
                raise self.fail(path, "missing required key")
            return default
        v = table[key]
        if not isinstance(v, str) or not v.strip():
            raise self.fail(path, f"must be a non-empty string, got {_kind(v)} {_show(v)}")
        return v

    def array_of_tables(self, doc: dict, key: str) -> list[dict]:
        v = doc.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
            raise self.fail(key, f"must be an array of tables ([[{key}]]), got {_kind(v)}")
        return v

    # -- the schema -----------------------------------------------------------------------
    def policy(self, doc: dict[str, Any]) -> Policy:
        self.known(doc, ("card", "thresholds", "placement", "task", "qos", "log", "state",
                         "status"), "")
        card = self.table(doc, "card", ("clock_mhz", "qos_burst"), required=False)
        clock_mhz = self.number(card, "clock_mhz", "card", default=125.0, lo=0, lo_open=True)
        qos_burst = self.integer(card, "qos_burst", "card", default=4096, lo=0, hi=0x7FFF)

        th = self.table(doc, "thresholds", RESOURCES, required=True)
        thresholds = {r: self.number(th, r, "thresholds", lo=0, hi=100) for r in RESOURCES}

        pl = self.table(doc, "placement", ("strategy", "dwell_us", "poll_us",
                                           "handoff_timeout_us", "stop_timeout_us"),
                        required=True)
        strategy = self.string(pl, "strategy", "placement")
        if strategy not in STRATEGIES:
            raise self.fail("placement.strategy",
                            f"must be one of {', '.join(map(repr, STRATEGIES))}, got {strategy!r}")
        dwell_us = self.number(pl, "dwell_us", "placement", lo=0)
        poll_us = self.number(pl, "poll_us", "placement", default=20.0, lo=0, lo_open=True)
        handoff = self.number(pl, "handoff_timeout_us", "placement", default=10_000.0,
                              lo=0, lo_open=True)
        stop = self.number(pl, "stop_timeout_us", "placement", default=10_000.0,
                           lo=0, lo_open=True)

        tasks = self.tasks(doc)
        qos = self.qos(doc)

        log = self.table(doc, "log", ("path",), required=False)
        state = self.table(doc, "state", ("path",), required=False)
        st = self.table(doc, "status", ("every_us", "functions"), required=False)
        status_every = self.number(st, "every_us", "status", default=1000.0, lo=0, lo_open=True)
        funcs = st.get("functions", [0])
        if not isinstance(funcs, list) or not all(
                isinstance(f, int) and not isinstance(f, bool) and 0 <= f <= 255 for f in funcs):
            raise self.fail("status.functions",
                            f"must be a list of function indices 0..255, got {_show(funcs)}")
        return Policy(
            thresholds=thresholds, tasks=tasks, strategy=strategy, dwell_us=float(dwell_us),
            poll_us=float(poll_us), handoff_timeout_us=float(handoff),
            stop_timeout_us=float(stop), clock_mhz=float(clock_mhz), qos_burst=qos_burst,
            qos=qos, log_path=self.string(log, "path", "log", default="firmware-events.jsonl"),
            state_path=self.string(state, "path", "state", default="firmware-state.json"),
            status_every_us=float(status_every), status_functions=tuple(funcs),
            source=self.source)

    def tasks(self, doc: dict) -> tuple[TaskPolicy, ...]:
        if "task" not in doc:
            raise self.fail("task", "missing required section (at least one [[task]])")
        raw = self.array_of_tables(doc, "task")
        if not 1 <= len(raw) <= MgmtBlockRegs.TASKS:
            raise self.fail("task", f"must have 1..{MgmtBlockRegs.TASKS} [[task]] entries, got {len(raw)}")
        tasks: list[TaskPolicy] = []
        for i, t in enumerate(raw):
            where = f"task[{i}]"
            self.known(t, ("name", "index", "priority", "cost"), where)
            name = self.string(t, "name", where)
            index = self.integer(t, "index", where, lo=0, hi=MgmtBlockRegs.TASKS - 1)
            priority = self.integer(t, "priority", where, default=0)
            cost_t = t.get("cost", {})
            if not isinstance(cost_t, dict):
                raise self.fail(f"{where}.cost", f"must be a table, got {_kind(cost_t)}")
            self.known(cost_t, RESOURCES, f"{where}.cost")
            cost = {r: self.number(cost_t, r, f"{where}.cost", default=0, lo=0, hi=100)
                    for r in RESOURCES}
            for other in tasks:
                if other.name == name:
                    raise self.fail(f"{where}.name", f"duplicate task name {name!r}")
                if other.index == index:
                    raise self.fail(f"{where}.index",
                                    f"duplicate task index {index} (also task {other.name!r})")
            tasks.append(TaskPolicy(name=name, index=index, priority=priority, cost=cost))
        return tuple(tasks)

    def qos(self, doc: dict) -> tuple[QosPolicy, ...]:
        out: list[QosPolicy] = []
        for i, q in enumerate(self.array_of_tables(doc, "qos")):
            where = f"qos[{i}]"
            self.known(q, ("function", "rate_bytes_per_clock", "burst"), where)
            fn = self.integer(q, "function", where, lo=0, hi=255)
            rate = self.number(q, "rate_bytes_per_clock", where, lo=0)
            try:
                qos_rate_units(rate)
            except ValueError as e:
                raise self.fail(f"{where}.rate_bytes_per_clock", str(e)) from None
            burst = self.integer(q, "burst", where, lo=0, hi=0x7FFF)
            if any(o.function == fn for o in out):
                raise self.fail(f"{where}.function", f"duplicate function {fn}")
            out.append(QosPolicy(function=fn, rate_bytes_per_clock=float(rate), burst=burst))
        return tuple(out)


def _kind(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(v), type(v).__name__)


def _show(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."
