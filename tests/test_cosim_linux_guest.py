"""``python -m cosim.vhost_serve`` with a Linux guest (Debian's kernel in QEMU) started by hand
on its socket. (The Linux guest benches themselves, cosim.benches.linux_guest, are rows of the
table in tests/test_cosim.py.)"""

import pytest
from cosim.runner import one_sim_params


@pytest.mark.parametrize("sim", one_sim_params("verilator"))
def test_vhost_serve_with_a_guest_started_by_hand(sim, tmp_path):
    """``python -m cosim.vhost_serve`` as a user runs it: it prints the QEMU options, a guest
    started by hand on the printed socket comes up on the card's VF1 and pings the peer, and
    the command prints a line per guest event."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from cosim.guest.image import ensure_image
    from cosim.guest.qemu import Guest, vhost_user_net

    sock = tmp_path / "vf1.sock"
    log = open(tmp_path / "serve.log", "w+")
    card = subprocess.Popen([sys.executable, "-m", "cosim.vhost_serve", "--sim", sim,
                             "--vfs", "1", "--dir", str(tmp_path), "--seconds", "600"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    guest = None
    try:
        t0 = time.monotonic()
        while not sock.exists():
            assert card.poll() is None, open(tmp_path / "serve.log").read()[-3000:]
            assert time.monotonic() - t0 < 600, "no vhost-user socket after 600 s"
            time.sleep(0.5)
        guest = Guest.start(ensure_image(), netdev_args=vhost_user_net(sock),
                            mac="02:0f:fc:00:00:01", ip="10.0.0.1/24", boot_timeout=120)
        guest.wait_ready()
        rc, out = guest.run("ping -c 3 -W 5 10.0.0.254", timeout=120)
        assert rc == 0 and " 0% packet loss" in out, out
        guest.kill()
        guest = None
        t0 = time.monotonic()
        while "front-end disconnected" not in open(tmp_path / "serve.log").read():
            assert time.monotonic() - t0 < 60, "the card did not notice the guest leaving"
            time.sleep(0.5)
    finally:
        if guest is not None:
            guest.kill()
        os.killpg(card.pid, signal.SIGKILL)
        card.wait()
    text = open(tmp_path / "serve.log").read()
    assert f"path={sock}" in text and "disable-legacy=on,vectors=0" in text, text[-3000:]
    assert "VF1: rings up" in text, text[-3000:]
