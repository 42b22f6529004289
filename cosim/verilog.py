"""Generated Verilog, cached per card configuration and per version of the hdl/ sources."""

import hashlib
import json
from pathlib import Path

from hdl.config import CardConfig

__all__ = ["REPO", "verilog_for", "config_key"]

REPO = Path(__file__).resolve().parent.parent
#: The packages the generated Verilog depends on: the gateware and the register map it reads.
SOURCES = (REPO / "hdl", REPO / "regmap")


def _hdl_digest():
    """A hash of every Python file of the gateware's packages, sub-folders included."""
    h = hashlib.sha256()
    for root in SOURCES:
        for p in sorted(root.rglob("*.py")):
            h.update(str(p.relative_to(REPO)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def config_key(cfg: CardConfig):
    """Short name of a configuration, used in file and build-directory names."""
    return f"vf{cfg.total_vfs}_w{cfg.data_width}_v{cfg.msix_vectors}"


def verilog_for(cfg: CardConfig, out_dir: Path = REPO / "build" / "verilog") -> Path:
    """Write (or reuse) the Verilog of ``cfg``; returns its path. Module name: ``offcard``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    key = config_key(cfg)
    digest = hashlib.sha256((_hdl_digest() + json.dumps(cfg.as_dict(), sort_keys=True)).encode()).hexdigest()[:12]
    path = out_dir / f"offcard_{key}.v"
    stamp = out_dir / f"offcard_{key}.stamp"
    if path.exists() and stamp.exists() and stamp.read_text() == digest:
        return path
    from hdl.__main__ import generate_verilog
    tmp = path.with_suffix(".v.tmp")
    tmp.write_text(generate_verilog(cfg, "offcard"))
    tmp.replace(path)
    stamp.write_text(digest)
    return path
