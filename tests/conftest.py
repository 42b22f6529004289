import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: The quick synthesis, started in the background (see :func:`pytest_collection_finish`).
SYNTH_QUICK_ARGV = [sys.executable, "-m", "hdl.synth", "--quick", "--place-only"]
SYNTH_TIMEOUT_S = 1800


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


def pytest_configure(config):
    """Fix the run's id in the controller, so that it is the one pytest-xdist hands its
    workers (its ``--testrunuid``)."""
    if getattr(config, "workerinput", None) is None:
        if getattr(config.option, "testrunuid", None) is None:
            config.option.testrunuid = uuid.uuid4().hex


def _run_id(config):
    """One id per test run, the same in the controller and in every pytest-xdist worker."""
    wi = getattr(config, "workerinput", None)
    return wi["testrunuid"] if wi is not None else config.option.testrunuid


def _synth_dir(config) -> Path:
    return Path(tempfile.gettempdir()) / f"offcard_synth_{_run_id(config)}"


def pytest_collection_finish(session):
    """When the quick synthesis test is selected, start its YoWASP run (about 8 minutes of one
    core, no simulator) as soon as the tests are known, in the background: it then runs beside
    the simulations instead of after them. With pytest-xdist every worker collects every test;
    the first to create the run's folder starts the one synthesis, and the test waits for its
    exit code wherever it runs."""
    if not any(item.path.name == "test_synth.py" and "quick" in item.fixturenames
               for item in session.items):
        return
    d = _synth_dir(session.config)
    try:
        d.mkdir()
    except FileExistsError:
        return                                   # another worker started it
    out = d / "out"
    out.mkdir()
    cmd = " ".join(map(str, SYNTH_QUICK_ARGV)) + f" -o {out} > {d / 'synth.log'} 2>&1; " \
          f"echo $? > {d / 'rc.tmp'} && mv {d / 'rc.tmp'} {d / 'rc'}"
    proc = subprocess.Popen(["sh", "-c", cmd], cwd=REPO, start_new_session=True)
    (d / "pid").write_text(str(proc.pid))


def pytest_sessionfinish(session):
    """The run's end (the controller's, with xdist): stop a synthesis still running, remove
    its folder."""
    if getattr(session.config, "workerinput", None) is not None:
        return
    d = _synth_dir(session.config)
    if not d.exists():
        return
    try:
        os.killpg(int((d / "pid").read_text()), signal.SIGKILL)
    except (OSError, ValueError):
        pass
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def synth_quick_run(request):
    """``(returncode, output folder, log text)`` of the quick synthesis: the background run
    when there is one, else a run now."""
    d = _synth_dir(request.config)
    if not d.exists():
        out = Path(tempfile.mkdtemp(prefix="offcard_synth_"))
        proc = subprocess.run([*SYNTH_QUICK_ARGV, "-o", str(out)], cwd=REPO,
                              capture_output=True, text=True, timeout=SYNTH_TIMEOUT_S)
        yield proc.returncode, out, proc.stdout + proc.stderr
        shutil.rmtree(out, ignore_errors=True)
        return
    deadline = time.monotonic() + SYNTH_TIMEOUT_S
    while not (d / "rc").exists():
        assert time.monotonic() < deadline, "the quick synthesis did not finish in time"
        time.sleep(2)
    rc = int((d / "rc").read_text().strip() or 1)
    yield rc, d / "out", (d / "synth.log").read_text(errors="replace")


#: Measured test durations (pytest-split's file: ``pytest --store-durations`` rewrites it).
DURATIONS = REPO / ".test_durations"


def pytest_collection_modifyitems(session, config, items):
    """The longest tests first, so that pytest-xdist's workers do not end the run on a long
    simulation started last; tests without a measured duration keep their order, after."""
    try:
        known = json.loads(DURATIONS.read_text())
    except (OSError, ValueError):
        return
    order = {item.nodeid: k for k, item in enumerate(items)}
    items.sort(key=lambda it: (-known.get(it.nodeid, 0.0), order[it.nodeid]))
