"""Co-simulation of the offcard: cocotb benches, the TLP bridge to cocotbext-pcie, runners.

``cosim.runner`` builds and runs benches under Icarus or Verilator (see its docstring).
"""
