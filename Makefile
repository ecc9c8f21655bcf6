# natmig: every target installs what it needs first, and only what is missing.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYANG := $(VENV)/bin/pyang

# Debian packages natmig uses: YANG tools, the NAT data plane (conntrack,
# nftables; iptables for the one xtables NFQUEUE rule that holds new sessions
# while admission is closed), Open vSwitch (userspace datapath; its service is
# never started), the tools the tests probe with, and the third-party NETCONF
# client yangcli.
APT_PACKAGES := python3-venv libyang-tools conntrack nftables iptables openvswitch-switch \
	iproute2 ethtool iputils-ping procps psmisc yangcli

.PHONY: help setup system venv test test-unit faults bench demo bindings tree lint clean

help:
	@echo "make demo      set up and run the four-step live migration demo"
	@echo "make test      set up and run the test suite (root needed for functional tests)"
	@echo "make faults    the fault-injection suite: migrations and agents killed anywhere (root, ~5 min)"
	@echo "make bench     set up and run the benchmarks, printing their figures"
	@echo "make bindings  regenerate bindings/ from yang/ with pyangbind"

setup: system venv

system:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; \
	fi

# The venv is rebuilt only when pyproject.toml changes.
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test,bench]'
	@touch $@

test: setup
	$(PY) -m pytest

test-unit: venv
	$(PY) -m pytest -m 'not root and not faults'

# The fault-injection suite (root): migrations killed anywhere, agents killed, two at once (~5 min).
faults: setup
	$(PY) -m pytest -m faults tests/functional/test_faults.py

# Benchmarks run from bench/out/, where those that write files (JSON, PNG) leave them.
# Every benchmark runs; the exit status says whether any missed a target or failed.
bench: setup
	@mkdir -p bench/out
	@failed=""; for b in bench/bench_*.py; do echo "== $$b"; 		(cd bench/out && $(CURDIR)/$(PY) $(CURDIR)/$$b) || failed="$$failed $$b"; done; 	if [ -n "$$failed" ]; then echo "benchmarks that missed a target or failed:$$failed"; exit 1; fi

demo: setup
	$(VENV)/bin/natmig demo

bindings: venv
	$(PYANG) --plugindir $$($(PY) -c 'import os, pyangbind; print(os.path.dirname(pyangbind.__file__))')/plugin \
		-f pybind -o bindings/nat_session.py yang/nat-session.yang
	$(PYANG) --plugindir $$($(PY) -c 'import os, pyangbind; print(os.path.dirname(pyangbind.__file__))')/plugin \
		-f pybind -p yang -o bindings/fw_state.py yang/fw-state.yang

tree: venv
	@$(PYANG) -f tree yang/nat-session.yang

lint: setup
	$(PYANG) --lint -p yang yang/nat-session.yang yang/natmig-state.yang yang/fw-state.yang examples/lb-binding.yang
	yanglint -p yang yang/nat-session.yang yang/natmig-state.yang yang/fw-state.yang examples/lb-binding.yang

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
