"""Example cocotb benches for a newcomer to copy: :mod:`cosim.examples.my_bench` is the one the
README's "Write your own bench" shows verbatim (``tests/test_readme_example.py`` checks that and
runs it)."""
