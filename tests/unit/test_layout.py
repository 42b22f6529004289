"""The house plan holds: the gateware's subsystems import only downwards, and the layers of the
repository keep their one-way flow (regmap <- hdl <- cosim; regmap <- host_driver, firmware)."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: What each hdl subsystem may import besides itself: the modules at hdl/'s top level that are
#: shared (config, memmap, iface) and the subsystems below it.
BASE = {"hdl.config", "hdl.memmap", "hdl.iface"}
BELOW = {
    "pcie": set(),
    "dma": {"pcie"},
    "iommu": {"pcie", "dma"},
    "virtio": {"pcie", "dma", "iommu"},
    "mgmt": {"pcie"},
}
TOP_LEVEL = {"__init__.py", "__main__.py", "card.py", "config.py", "memmap.py", "iface.py",
             "synth.py"}


def module_name(path):
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path):
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    pkg = module_name(path).split(".")
    if path.name != "__init__.py":
        pkg = pkg[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - node.level + 1]
                out.add(".".join(base + ([node.module] if node.module else [])))
            else:
                out.add(node.module)
    return out


def py_files(folder):
    return sorted((REPO / folder).rglob("*.py"))


def test_hdl_top_level_holds_only_shared_modules():
    assert {p.name for p in (REPO / "hdl").glob("*.py")} == TOP_LEVEL
    assert {p.name for p in (REPO / "hdl").iterdir() if p.is_dir() and p.name != "__pycache__"} \
        == set(BELOW)


@pytest.mark.parametrize("sub", sorted(BELOW))
def test_subsystem_imports_only_downwards(sub):
    allowed = {f"hdl.{s}" for s in BELOW[sub] | {sub}}
    for path in py_files(f"hdl/{sub}"):
        for mod in imports(path):
            if not mod.startswith("hdl"):
                continue
            ok = mod in BASE or any(mod == a or mod.startswith(a + ".") for a in allowed)
            assert ok, f"{path.relative_to(REPO)} imports {mod}: not below hdl.{sub}"


def test_shared_hdl_modules_import_no_subsystem():
    for name in ("config.py", "memmap.py", "iface.py"):
        for mod in imports(REPO / "hdl" / name):
            assert not mod.startswith("hdl.") or mod in BASE, f"hdl/{name} imports {mod}"


@pytest.mark.parametrize("folder, forbidden", [
    ("regmap", ("hdl", "cosim", "host_driver", "firmware", "amaranth", "cocotb")),
    ("hdl", ("cosim", "host_driver", "firmware", "cocotb")),
    ("host_driver", ("hdl", "cosim", "firmware", "amaranth", "cocotb")),
    ("firmware", ("hdl", "cosim", "host_driver", "amaranth", "cocotb")),
])
def test_layers_flow_one_way(folder, forbidden):
    for path in py_files(folder):
        for mod in imports(path):
            assert mod.split(".")[0] not in forbidden, \
                f"{path.relative_to(REPO)} imports {mod}"
