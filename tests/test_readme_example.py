"""The README's "Write your own bench": the module it shows is cosim/examples/my_bench.py byte
for byte, and that module runs on the card with every one of its cocotb tests passing."""

import pytest
from cosim.card_sim import run_card_bench
from cosim.runner import REPO, cocotb_tests, one_sim_params

EXAMPLE = "cosim.examples.my_bench"
SECTION = "## Write your own bench\n"


def readme_example() -> bytes:
    """The first ``python`` fenced block of the README's section, as bytes."""
    text = (REPO / "README.md").read_bytes()
    section = text.split(SECTION.encode(), 1)[1].split(b"\n## ", 1)[0]
    return section.split(b"\n```python\n", 1)[1].split(b"\n```\n", 1)[0] + b"\n"


def test_readme_shows_the_example_verbatim():
    shown = readme_example()
    path = REPO / "cosim" / "examples" / "my_bench.py"
    assert shown == path.read_bytes(), f"the README's block under {SECTION.strip()!r} is not {path}"


@pytest.mark.parametrize("sim", one_sim_params("verilator"))
def test_example_bench_passes(sim):
    res = run_card_bench(sim, EXAMPLE)
    assert res.num_failed == 0 and sorted(res.testcases) == sorted(cocotb_tests(EXAMPLE)), res
