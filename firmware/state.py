"""The firmware's persisted state: placements, moves in flight, the event sequence number.

One JSON file, replaced atomically (temporary file in the same directory, fsync, os.replace,
fsync of the directory), so after a crash it holds either the old or the new state::

    {"version": 1, "seq": 42,
     "placement": {"qos": "card", "log": "host"},
     "moves": {"qos": {"task": "qos", "index": 0, "to": "host", "phase": "stopping_card",
                       "since_us": 1234.5, "deadline_us": 11234.5}}}
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field

__all__ = ["MoveRecord", "FirmwareState", "StateStore", "StateError", "PHASES"]

VERSION = 1

#: Phases a move record can be in (see firmware.mover).
PHASES = {"host": ("stopping_card", "flip"), "card": ("starting_card", "flip", "stopping_host")}


class StateError(Exception):
    """The state file cannot be read or written; ``str()`` is one line."""


@dataclass
class MoveRecord:
    """A move in flight. ``phase`` is written before the action it names is taken."""
    task: str
    index: int
    to: str                  # "card" or "host"
    phase: str
    since_us: float          # card time the move began
    deadline_us: float       # card time its current wait (READY, STOPPED) gives up


@dataclass
class FirmwareState:
    placement: dict[str, str] = field(default_factory=dict)
    moves: dict[str, MoveRecord] = field(default_factory=dict)
    seq: int = 0

    def to_json(self) -> dict:
        return {"version": VERSION, "seq": self.seq, "placement": dict(self.placement),
                "moves": {k: asdict(v) for k, v in self.moves.items()}}

    @classmethod
    def from_json(cls, doc: object) -> "FirmwareState":
        if not isinstance(doc, dict):
            raise ValueError("top level is not an object")
        if doc.get("version") != VERSION:
            raise ValueError(f"version {doc.get('version')!r}, expected {VERSION}")
        seq = doc.get("seq", 0)
        placement = doc.get("placement", {})
        moves = doc.get("moves", {})
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ValueError(f"seq {seq!r} is not a count")
        if not isinstance(placement, dict) or not all(
                isinstance(k, str) and v in ("card", "host") for k, v in placement.items()):
            raise ValueError("placement must map task names to 'card' or 'host'")
        if not isinstance(moves, dict):
            raise ValueError("moves must be an object")
        recs: dict[str, MoveRecord] = {}
        for name, m in moves.items():
            try:
                rec = MoveRecord(**m)
            except TypeError as e:
                raise ValueError(f"move {name!r}: {e}") from None
            if (rec.to not in PHASES or rec.phase not in PHASES[rec.to] or rec.task != name
                    or isinstance(rec.index, bool) or not isinstance(rec.index, int)):
                raise ValueError(f"move {name!r}: bad record {m!r}")
            recs[name] = rec
        return cls(placement=placement, moves=recs, seq=seq)


class StateStore:
    """Loads and atomically saves a :class:`FirmwareState` at ``path``.

    ``durable=False`` skips the fsyncs: the replace stays atomic against a crash of the
    process, not against a power cut (for tests and tmpfs)."""

    durable = True

    def __init__(self, path: str, durable: bool | None = None):
        self.path = os.fspath(path)
        if durable is not None:
            self.durable = durable

    def load(self) -> FirmwareState:
        """The saved state; a fresh one if the file does not exist."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return FirmwareState()
        except OSError as e:
            raise StateError(f"{self.path}: cannot read state: {e.strerror or e}") from None
        try:
            return FirmwareState.from_json(json.loads(raw))
        except (ValueError, UnicodeDecodeError) as e:
            msg = " ".join(str(e).split())
            raise StateError(f"{self.path}: corrupt state file: {msg}") from None

    def save(self, state: FirmwareState) -> None:
        """Replace the file with ``state``: readers see the old or the new file, never a mix."""
        directory = os.path.dirname(os.path.abspath(self.path))
        data = json.dumps(state.to_json(), indent=1, sort_keys=True).encode() + b"\n"
        try:
            fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=directory)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    if self.durable:
                        os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            if self.durable:
                _fsync_dir(directory)
        except OSError as e:
            raise StateError(f"{self.path}: cannot write state: {e.strerror or e}") from None


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
