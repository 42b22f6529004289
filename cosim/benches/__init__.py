"""cocotb test modules; each is run by a pytest test in tests/ through cosim.runner."""
