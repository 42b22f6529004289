"""Generated Verilog, cached per card configuration, top and version of the sources.

Two tops: ``offcard``, the card as it is synthesized, and ``offcard_sim``, the card behind the
TLP shim of co-simulation builds (:mod:`cosim.tlp_shim`)."""

import hashlib
import json
import os
import re
from pathlib import Path

from hdl.config import CardConfig

__all__ = ["REPO", "verilog_for", "config_key", "TOPS", "module_ports", "module_header",
           "write_file", "write_if_changed"]

REPO = Path(__file__).resolve().parent.parent
#: The packages the generated Verilog depends on: the gateware and the register map it reads.
SOURCES = (REPO / "hdl", REPO / "regmap")
#: The tops, and the sources each depends on besides SOURCES.
TOPS = {"offcard": (), "offcard_sim": (REPO / "cosim" / "tlp_shim.py",)}


def _hdl_digest(extra=()):
    """A hash of every Python file of the gateware's packages, sub-folders included."""
    h = hashlib.sha256()
    for root in SOURCES:
        for p in sorted(root.rglob("*.py")):
            h.update(str(p.relative_to(REPO)).encode())
            h.update(p.read_bytes())
    for p in extra:
        h.update(str(p.relative_to(REPO)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def config_key(cfg: CardConfig):
    """Short name of a configuration, used in file and build-directory names."""
    return f"vf{cfg.total_vfs}_w{cfg.data_width}_v{cfg.msix_vectors}"


def verilog_for(cfg: CardConfig, out_dir: Path = REPO / "build" / "verilog",
                top: str = "offcard") -> Path:
    """Write (or reuse) the Verilog of ``cfg`` with module ``top`` (one of :data:`TOPS`);
    returns its path."""
    if top not in TOPS:
        raise ValueError(f"unknown top {top!r}; choose from {', '.join(TOPS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = config_key(cfg)
    digest = hashlib.sha256((_hdl_digest(TOPS[top]) + json.dumps(cfg.as_dict(), sort_keys=True))
                            .encode()).hexdigest()[:12]
    path = out_dir / f"{top}_{key}.v"
    stamp = out_dir / f"{top}_{key}.stamp"
    if path.exists() and stamp.exists() and stamp.read_text() == digest:
        return path
    from hdl.__main__ import generate_verilog
    elab = None
    if top == "offcard_sim":
        from .tlp_shim import SimCard
        elab = SimCard(cfg)
    write_file(path, generate_verilog(cfg, top, elab))
    write_file(stamp, digest)
    return path


def write_file(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` whole or not at all: through a file of this process's own,
    renamed over ``path``, so that parallel test workers writing one file never meet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def write_if_changed(path: Path, text: str) -> Path:
    """:func:`write_file` unless ``path`` already holds ``text`` (its date then stays, and with
    it the simulators' cached builds)."""
    if not path.exists() or path.read_text() != text:
        write_file(path, text)
    return path


_HEADER = re.compile(r"^module\s+(\w+)\s*\((.*?)\)\s*;", re.S | re.M)


def module_header(text: str, module: str, where="the Verilog") -> tuple[list[str], int]:
    """The port names of ``module`` in Verilog ``text``, in its header's order, and the offset
    where its body starts."""
    for m in _HEADER.finditer(text):
        if m.group(1) == module:
            return [n.strip() for n in m.group(2).split(",") if n.strip()], m.end()
    raise ValueError(f"{where}: no module {module}")


def module_ports(src: Path, module: str) -> list[str]:
    """The port names of ``module`` in the Verilog file ``src``, in its header's order."""
    return module_header(Path(src).read_text(), module, src)[0]
