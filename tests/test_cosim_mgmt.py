"""The firmware against the simulated card as two processes, over pyserial, in both
simulators. (The management bench itself, cosim.benches.mgmt, is a row of the table in
tests/test_cosim.py.)"""

import pytest
from cosim.runner import sim_params


@pytest.mark.parametrize("sim", sim_params())
def test_firmware_cli_on_served_card(sim, tmp_path):
    """Two processes, as on a bench with a board: ``python -m cosim.serve_uart`` runs the
    simulated card and serves its UART on a TCP port; ``python -m firmware --port socket://...``
    connects with pyserial, polls and exits cleanly."""
    import subprocess
    import sys
    import time
    from pathlib import Path
    repo = Path(__file__).resolve().parent.parent
    url_file = tmp_path / "url"
    policy = tmp_path / "policy.toml"
    policy.write_text((repo / "firmware" / "example_policy.toml").read_text()
                      .replace('"firmware-events.jsonl"', f'"{tmp_path}/events.jsonl"')
                      .replace('"firmware-state.json"', f'"{tmp_path}/state.json"'))
    card = subprocess.Popen([sys.executable, "-m", "cosim.serve_uart", "--sim", sim, "--port", "0",
                             "--once", "--seconds", "600", "--url-file", str(url_file)],
                            cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 900
        while not url_file.exists():
            assert card.poll() is None, card.stdout.read()
            assert time.monotonic() < deadline, "the simulated card never opened its UART"
            time.sleep(0.5)
        url = url_file.read_text().strip()
        assert url.startswith("socket://127.0.0.1:")
        fw = subprocess.run([sys.executable, "-m", "firmware", "--port", url, "--policy",
                             str(policy), "--max-polls", "5", "--link-timeout", "120"],
                            cwd=repo, capture_output=True,
                            text=True, timeout=600)
        assert fw.returncode == 0, fw.stderr
        assert "5 polls" in fw.stdout and "qos=card" in fw.stdout, fw.stdout
        events = (tmp_path / "events.jsonl").read_text()
        assert '"qos_set"' in events and '"start"' in events and '"status"' in events, events[:500]
        card.wait(timeout=300)
        assert card.returncode == 0
    finally:
        if card.poll() is None:
            card.kill()
