"""The bench table of tests/test_cosim.py and the test finder it checks against
(:func:`cosim.runner.cocotb_tests`), without a simulator."""

import pkgutil
import textwrap
import uuid

import pytest
import cosim.benches
from cosim.runner import cocotb_tests
from hdl.config import CardConfig
from test_cosim import BENCHES, Bench, bench_params

#: Benches not in the table: the runner's own (tests/test_runner_smoke.py), and the one that
#: compares the two TLP paths (tests/test_cosim_paths.py).
RUNNER_BENCHES = {"cosim.benches.smoke_counter", "cosim.benches.smoke_fail",
                  "cosim.benches.paths"}


@pytest.fixture
def module(tmp_path, monkeypatch):
    """Write a module of the given source under a package of this test's own; its dotted name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    pkg = f"fake_benches_{uuid.uuid4().hex}"
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text("")

    def write(name, source):
        (tmp_path / pkg / f"{name}.py").write_text(textwrap.dedent(source))
        return f"{pkg}.{name}"
    return write


def test_two_tests_are_found_as_two(module):
    name = module("two", """
        import cocotb
        from cocotb.triggers import Timer

        async def helper(dut):
            await Timer(1, "ns")

        @cocotb.test()
        async def test_first(dut):
            await helper(dut)

        @cocotb.test
        async def second(dut):
            pass
    """)
    assert cocotb_tests(name) == ["test_first", "second"]


def test_the_forms_of_the_decorator(module):
    """``@test`` imported from cocotb (under another name too), ``import cocotb as ...``,
    ``name=``; another decorator, a nested function and a method are not tests."""
    name = module("forms", """
        import functools
        import cocotb as cb
        from cocotb import test, test as t

        @test(timeout_time=1, timeout_unit="ms")
        async def a(dut):
            @cb.test()
            async def nested(dut):
                pass

        @t
        async def b(dut):
            pass

        @cb.test(name="renamed")
        async def c(dut):
            pass

        @functools.cache
        def not_a_test():
            pass

        class Helper:
            @cb.test()
            async def method(self, dut):
                pass
    """)
    assert cocotb_tests(name) == ["a", "b", "renamed"]


def test_a_module_without_cocotb_tests_is_an_error(module):
    name = module("none", """
        import cocotb

        async def test_not_decorated(dut):
            pass
    """)
    with pytest.raises(ValueError, match="defines no cocotb test"):
        cocotb_tests(name)


def test_parametrized_tests_are_refused(module):
    name = module("param", """
        import cocotb

        @cocotb.test()
        @cocotb.parametrize(x=[1, 2])
        async def test_x(dut, x):
            pass
    """)
    with pytest.raises(ValueError, match="parametrize"):
        cocotb_tests(name)


def test_a_missing_module_is_an_error():
    with pytest.raises(ModuleNotFoundError):
        cocotb_tests("cosim.benches.no_such_bench")


def test_testcase_filter_as_cocotb_applies_it(module):
    """cocotb's runner selects the tests whose full name ends with a name of the filter."""
    name = module("filtered", """
        import cocotb

        @cocotb.test()
        async def test_a(dut):
            pass

        @cocotb.test()
        async def test_b(dut):
            pass

        @cocotb.test()
        async def other_test_b(dut):
            pass
    """)
    assert cocotb_tests(name, "test_a") == ["test_a"]
    assert cocotb_tests(name, "test_b") == ["test_b", "other_test_b"]
    assert cocotb_tests(name, "test_a,test_b") == ["test_a", "test_b", "other_test_b"]
    assert cocotb_tests(name, ["test_a"]) == ["test_a"]
    with pytest.raises(ValueError, match="no cocotb test matches"):
        cocotb_tests(name, "test_c")


def test_every_row_names_tests_and_every_bench_has_a_row():
    for b in BENCHES:
        assert cocotb_tests(b.module, b.testcase), b
    names = [b.name for b in BENCHES]
    assert len(set(names)) == len(names), names
    modules = {m.name for m in pkgutil.iter_modules(cosim.benches.__path__, "cosim.benches.")}
    assert modules - RUNNER_BENCHES == {b.module for b in BENCHES}


def test_params_carry_the_simulator_id_width_and_marks():
    rows = [Bench("x", "cosim.benches.dma", [pytest.param("verilator", 128, id="verilator-128",
                                                          marks=pytest.mark.sim)]),
            Bench("y", "cosim.benches.twin", [pytest.param("icarus", id="icarus")],
                  CardConfig(total_vfs=64))]
    (px,), (py,) = [bench_params([r]) for r in rows]
    assert px.id == "x-verilator-128" and px.values[1:] == ("verilator", CardConfig(data_width=128))
    assert [m.name for m in px.marks] == ["sim"]
    assert py.id == "y-icarus" and py.values[2] == CardConfig(total_vfs=64)
