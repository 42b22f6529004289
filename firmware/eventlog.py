"""The firmware's event log: JSON lines, one object per event, flushed per line.

Every line has ``seq`` (increasing across restarts), ``t_us`` (card time, microseconds) and
``event``, plus the event's fields::

    {"seq": 7, "t_us": 812.4, "event": "move_begin", "task": "qos", "index": 0, "to": "host"}

Events: start, util_sample (only when a value changed), threshold_crossed, move_begin,
move_phase, move_done, move_rollback, request_served, qos_set, error.
"""

from __future__ import annotations

import json
import os
from typing import Any, IO

__all__ = ["EventLog", "LogError", "EVENTS"]

EVENTS = frozenset({"start", "util_sample", "threshold_crossed", "move_begin", "move_phase",
                    "move_done", "move_rollback", "request_served", "qos_set", "status", "error"})


class LogError(Exception):
    """The event log cannot be opened; ``str()`` is one line."""


class EventLog:
    """Appends events to ``path`` (None: keep nothing on disk). ``seq`` is the last sequence
    number used; the log continues after the larger of it and the file's last line."""

    def __init__(self, path: str | None, seq: int = 0):
        self.path = path
        self.seq = seq
        self._last_util: dict[str, Any] | None = None
        self._f: IO[str] | None = None
        if path is not None:
            self.seq = max(seq, _last_seq(path))
            try:
                self._f = open(path, "a", encoding="utf-8")
            except OSError as e:
                raise LogError(f"{path}: cannot open the event log: {e.strerror or e}") from None
            if self._f.tell() > 0 and not _ends_with_newline(path):
                self._f.write("\n")          # a line cut short by a crash stays on its own

    def emit(self, t_us: float, event: str, **fields: Any) -> dict[str, Any]:
        """Write one event and flush it; returns the record."""
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}")
        self.seq += 1
        rec = {"seq": self.seq, "t_us": round(float(t_us), 3), "event": event, **fields}
        if self._f is not None:
            self._f.write(json.dumps(rec, separators=(",", ":")) + "\n")
            self._f.flush()
        return rec

    def util_sample(self, t_us: float, util: dict[str, Any]) -> bool:
        """Log ``util`` if it differs from the last one logged; True if it did."""
        if util == self._last_util:
            return False
        self._last_util = dict(util)
        self.emit(t_us, "util_sample", **util)
        return True

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _last_seq(path: str) -> int:
    """The ``seq`` of the last complete line of the log at ``path`` (0 if none)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65536))
            tail = f.read()
    except FileNotFoundError:
        return 0
    for line in reversed(tail.splitlines()):
        try:
            seq = json.loads(line).get("seq")
        except (ValueError, AttributeError):
            continue
        if isinstance(seq, int):
            return seq
    return 0
