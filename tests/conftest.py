import shutil
import subprocess
import sys
import tempfile
import pytest
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: The quick synthesis, started in the background (see :func:`pytest_collection_finish`).
_SYNTH: dict = {}
SYNTH_QUICK_ARGV = [sys.executable, "-m", "hdl.synth", "--quick", "--place-only"]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


def pytest_collection_finish(session):
    """When the quick synthesis test is selected, start its YoWASP run (about 8 minutes of one
    core, no simulator) as soon as the tests are known: it then runs beside the simulations,
    which leave the second core idle most of the time, instead of after them."""
    if not any(item.path.name == "test_synth.py" and "quick" in item.fixturenames
               for item in session.items):
        return
    out = Path(tempfile.mkdtemp(prefix="offcard_synth_"))
    log = open(out / "synth.log", "w")
    _SYNTH.update(out=out, log=log, proc=subprocess.Popen(
        [*SYNTH_QUICK_ARGV, "-o", str(out)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT))


def pytest_sessionfinish(session):
    proc = _SYNTH.get("proc")
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()
    if _SYNTH:
        _SYNTH["log"].close()
        shutil.rmtree(_SYNTH["out"], ignore_errors=True)


@pytest.fixture(scope="session")
def synth_quick_run():
    """``(returncode, output folder, log text)`` of the quick synthesis: the background run
    when there is one, else a run now."""
    if not _SYNTH:
        out = Path(tempfile.mkdtemp(prefix="offcard_synth_"))
        proc = subprocess.run([*SYNTH_QUICK_ARGV, "-o", str(out)], cwd=REPO,
                              capture_output=True, text=True, timeout=1800)
        yield proc.returncode, out, proc.stdout + proc.stderr
        shutil.rmtree(out, ignore_errors=True)
        return
    rc = _SYNTH["proc"].wait(timeout=1800)
    _SYNTH["log"].flush()
    yield rc, _SYNTH["out"], (_SYNTH["out"] / "synth.log").read_text(errors="replace")
