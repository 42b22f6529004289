"""Every supported configuration elaborates, and `python -m hdl` rejects bad arguments in one line."""

import subprocess
import sys
import pytest
from amaranth.back import rtlil
from hdl.card import Card
from hdl.config import CardConfig


@pytest.mark.parametrize("cfg", [CardConfig(data_width=256), CardConfig(total_vfs=64),
                                 CardConfig(total_vfs=1, msix_vectors=1)],
                         ids=["w256", "vf64", "vf1_v1"])
def test_card_elaborates(cfg):
    text = rtlil.convert(Card(cfg), name="offcard")
    assert "module \\offcard" in text


@pytest.mark.parametrize("args,word", [(["--data-width", "96"], "data_width"),
                                       (["--total-vfs", "0"], "total_vfs"),
                                       (["--msix-vectors", "3"], "msix_vectors")])
def test_cli_rejects_bad_configuration(args, word):
    r = subprocess.run([sys.executable, "-m", "hdl", *args, "-o", "/dev/null"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and word in lines[0], r.stderr
