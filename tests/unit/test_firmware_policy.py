"""Policy validation (one-line errors) and the command line."""

import os
import subprocess
import sys
import types
import pytest
from fakes import FakeMgmtBlock
from firmware import __main__ as cli
from firmware.policy import Policy, PolicyError, load_policy, parse_policy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "firmware" / "example_policy.toml"

GOOD = """\
[card]
clock_mhz = 125.0
[thresholds]
custom_hw = 80
processor = 75
memory = 85
network = 70
[placement]
strategy = "priority"
dwell_us = 200.0
poll_us = 20.0
[[task]]
name = "qos"
index = 0
priority = 3
cost = { custom_hw = 5, processor = 10, memory = 5, network = 0 }
[[task]]
name = "mon"
index = 1
[[qos]]
function = 1
rate_bytes_per_clock = 0.5
burst = 4096
[log]
path = "events.jsonl"
[state]
path = "state.json"
"""


def test_example_policy_is_valid():
    p = load_policy(str(EXAMPLE))
    assert isinstance(p, Policy)
    assert p.strategy == "priority" and len(p.tasks) == 3
    assert p.thresholds == {"custom_hw": 80, "processor": 75, "memory": 85, "network": 70}
    assert p.tasks[0].cost["processor"] == 10


def test_good_policy_and_defaults():
    p = parse_policy(GOOD)
    assert p.clock_mhz == 125.0 and p.dwell_us == 200.0 and p.poll_us == 20.0
    assert p.task("mon").priority == 0
    assert p.task("mon").cost == {"custom_hw": 0, "processor": 0, "memory": 0, "network": 0}
    assert p.qos[0].rate_bytes_per_clock == 0.5 and p.qos[0].burst == 4096
    assert (p.log_path, p.state_path) == ("events.jsonl", "state.json")
    minimal = parse_policy(GOOD.split("[[qos]]")[0].replace("[card]\nclock_mhz = 125.0\n", ""))
    assert minimal.clock_mhz == 125.0 and minimal.qos == ()


def edit(old, new):
    assert old in GOOD, old
    return GOOD.replace(old, new, 1)


BAD = {
    "unknown top-level key": ("extra = 1\n" + GOOD, ": extra: unknown key (allowed: card, "),
    "unknown key at the end": (GOOD + "extra = 1\n", "state.extra: unknown key (allowed: path)"),
    "unknown section": ("[cardd]\nx = 1\n" + GOOD, ": cardd: unknown key"),
    "unknown threshold key": (edit("network = 70", "network = 70\ndisk = 5"),
                              "thresholds.disk: unknown key"),
    "unknown task key": (edit('name = "mon"', 'name = "mon"\nweight = 2'),
                         "task[1].weight: unknown key"),
    "unknown cost key": (edit("network = 0 }", "gpu = 1 }"), "task[0].cost.gpu: unknown key"),
    "unknown placement key": (edit("poll_us = 20.0", "poll_ms = 20.0"),
                              "placement.poll_ms: unknown key"),
    "negative threshold": (edit("memory = 85", "memory = -5"), "thresholds.memory: must be >= 0"),
    "threshold above 100": (edit("memory = 85", "memory = 101"),
                            "thresholds.memory: must be >= 0 and <= 100, got 101"),
    "non-numeric threshold": (edit("processor = 75", 'processor = "75"'),
                              "thresholds.processor: must be a number, got string '75'"),
    "boolean threshold": (edit("processor = 75", "processor = true"),
                          "thresholds.processor: must be a number, got boolean"),
    "missing threshold key": (edit("custom_hw = 80\n", ""), "thresholds.custom_hw: missing required key"),
    "missing thresholds": (GOOD.replace("[thresholds]\ncustom_hw = 80\nprocessor = 75\n"
                                        "memory = 85\nnetwork = 70\n", ""),
                           "thresholds: missing required section"),
    "missing placement": (edit('[placement]\nstrategy = "priority"\ndwell_us = 200.0\npoll_us = 20.0\n', ""),
                          "placement: missing required section"),
    "missing tasks": (GOOD[:GOOD.index("[[task]]")] + "[log]\npath = \"x\"\n",
                      "task: missing required section"),
    "bad strategy": (edit('"priority"', '"random"'),
                     "placement.strategy: must be one of 'priority', 'fit', got 'random'"),
    "strategy not a string": (edit('"priority"', "1"), "placement.strategy: must be a non-empty string"),
    "duplicate task name": (edit('name = "mon"', 'name = "qos"'),
                            "task[1].name: duplicate task name 'qos'"),
    "duplicate task index": (edit("index = 1", "index = 0"), "task[1].index: duplicate task index 0"),
    "index out of range": (edit("index = 1", "index = 4"), "task[1].index: must be in 0..3, got 4"),
    "index a float": (edit("index = 1", "index = 1.0"), "task[1].index: must be an integer"),
    "too many tasks": (GOOD + "".join(f'[[task]]\nname = "t{i}"\nindex = {i}\n' for i in (2, 3, 3)),
                       "task: must have 1..4 [[task]] entries, got 5"),
    "negative dwell": (edit("dwell_us = 200.0", "dwell_us = -1"), "placement.dwell_us: must be >= 0"),
    "zero poll": (edit("poll_us = 20.0", "poll_us = 0"), "placement.poll_us: must be > 0"),
    "zero clock": (edit("clock_mhz = 125.0", "clock_mhz = 0"), "card.clock_mhz: must be > 0"),
    "qos rate below 1/256": (edit("rate_bytes_per_clock = 0.5", "rate_bytes_per_clock = 0.001"),
                             "qos[0].rate_bytes_per_clock: rate 0.001 B/clk is below 1/256"),
    "qos burst too big": (edit("burst = 4096", "burst = 40000"), "qos[0].burst: must be in 0..32767"),
    "task not a table array": (GOOD.replace("[[task]]", "[[tsk]]"), ": tsk: unknown key"),
    "bad TOML": (edit("dwell_us = 200.0", "dwell_us = = 200"), "bad TOML: "),
    "bad TOML (duplicate key)": (edit("memory = 85", "memory = 85\nmemory = 86"), "bad TOML: "),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_policy_errors_are_one_line(case, tmp_path):
    text, want = BAD[case]
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as e:
        load_policy(str(path))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: "), msg
    assert want in msg, msg


def test_missing_policy_file(tmp_path):
    with pytest.raises(PolicyError, match=r"nope\.toml: cannot read: "):
        load_policy(str(tmp_path / "nope.toml"))


# -- the command line ----------------------------------------------------------------------
def run_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "firmware", *args], capture_output=True,
                          text=True, env=env, cwd=cwd or ROOT, timeout=60)


def test_cli_check_ok():
    r = run_cli("--check", "--policy", str(EXAMPLE))
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout and r.stderr == ""


@pytest.mark.parametrize("case", ["negative threshold", "unknown cost key", "bad TOML",
                                  "missing thresholds", "bad strategy", "boolean threshold"])
def test_cli_bad_policy_exit_2(case, tmp_path):
    text, want = BAD[case]
    path = tmp_path / "p.toml"
    path.write_text(text)
    r = run_cli("--check", "--policy", str(path))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and want in r.stderr, r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("args,want", [
    ((), "--port is required"),
    (("--check",), "the following arguments are required: --policy"),
    (("--port", "loop://", "--max-polls", "0"), "argument --max-polls: must be > 0"),
    (("--port", "loop://", "--bogus"), "unrecognized arguments: --bogus"),
    (("--port", "loop://", "--link-timeout", "-1"), "argument --link-timeout: must be > 0"),
])
def test_cli_bad_arguments_exit_2(args, want):
    if "--policy" not in args and args != ("--check",):
        args = args + ("--policy", str(EXAMPLE))
    r = run_cli(*args)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and want in r.stderr, r.stderr


class _LinkError(Exception):
    pass


@pytest.fixture
def fake_link(monkeypatch):
    """Stand a fake ``firmware.link`` in for the UART: ``UartLink(url)`` opens a FakeMgmtBlock's
    card port; the url "fail://" raises LinkError on open, "drop://" on the 5th access."""
    card = FakeMgmtBlock()

    class UartLink:
        def __init__(self, url, timeout=5.0):
            assert timeout > 0
            if url == "fail://":
                raise _LinkError("could not open port fail://: no such device")
            self.url, self.n = url, 0

        def sync(self):                  # (the ping the firmware starts with)
            self._count()
            return 0

        def read(self, addr):
            self._count()
            return card.card_port.read(addr)

        def write(self, addr, value):
            self._count()
            card.card_port.write(addr, value)

        def _count(self):
            self.n += 1
            if self.url == "drop://" and self.n > 5:
                raise _LinkError("no reply from the card (timeout)")

        def close(self):
            pass

    mod = types.ModuleType("firmware.link")
    mod.UartLink, mod.LinkError = UartLink, _LinkError
    monkeypatch.setitem(sys.modules, "firmware.link", mod)
    return card


def test_cli_runs_against_the_card(fake_link, tmp_path, capsys):
    fake_link.set_util(processor=99)
    state, log = tmp_path / "s.json", tmp_path / "e.jsonl"
    rc = cli.main(["--port", "socket://x:1", "--policy", str(EXAMPLE), "--state", str(state),
                   "--log", str(log), "--max-polls", "3"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "3 polls" in out
    assert state.exists() and '"event":"start"' in log.read_text()
    assert '"event":"status"' in log.read_text()
    assert fake_link.qos[1] == [128, 4096]       # the example's [[qos]]: 0.5 B/clk


@pytest.mark.parametrize("url,want", [("fail://", "could not open port"),
                                      ("drop://", "no reply from the card")])
def test_cli_link_error_exit_1(fake_link, tmp_path, capsys, url, want):
    rc = cli.main(["--port", url, "--policy", str(EXAMPLE), "--state", str(tmp_path / "s"),
                   "--log", str(tmp_path / "l"), "--max-polls", "3"])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and want in err and url in err


def test_cli_corrupt_state_exit_1(fake_link, tmp_path, capsys):
    state = tmp_path / "s.json"
    state.write_text("{not json")
    rc = cli.main(["--port", "x://", "--policy", str(EXAMPLE), "--state", str(state),
                   "--log", str(tmp_path / "l"), "--max-polls", "1"])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "corrupt state file" in err


def test_status_section():
    p = parse_policy(GOOD + "\n[status]\nevery_us = 50\nfunctions = [0, 3]\n")
    assert p.status_every_us == 50 and p.status_functions == (0, 3)
    for bad, key in (("functions = [300]", "status.functions"), ("functions = 1", "status.functions"),
                     ("every_us = -1", "every_us"), ("colour = 1", "colour")):
        with pytest.raises(PolicyError) as e:
            parse_policy(GOOD + f"\n[status]\n{bad}\n")
        assert key in str(e.value) and "\n" not in str(e.value)
