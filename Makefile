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
# client yangcli (and ssh, which scrapli-netconf's system transport runs),
# and conntrackd, the peer the migration benchmark measures natmig against
# (its service is never started either: see `system`).
APT_PACKAGES := python3-venv libyang-tools conntrack nftables iptables openvswitch-switch \
	iproute2 ethtool iputils-ping procps psmisc yangcli openssh-client conntrackd

.PHONY: help setup system venv test test-unit typecheck faults bench bench-large demo bindings tree lint man install-man-venv install-systemd clean

# Every target, with what it does: `make help` prints this list (a test checks it names every target).
help:
	@echo "make demo             set up and run the four-step live migration demo"
	@echo "make test             set up, type-check (make typecheck) and run the test suite (root needed for functional tests)"
	@echo "make typecheck        mypy on natmig's packages (a tree of links shaped as the installed package)"
	@echo "make test-unit        the tests that need no root (no namespaces, no kernel)"
	@echo "make faults           the fault-injection suite: migrations and agents killed anywhere, either engine (root, ~10 min)"
	@echo "make bench            set up and run the benchmarks, printing their figures"
	@echo "make bench-large      the migration benchmark at 1,000,000 sessions, added to bench/out/bench_migrate.json (root, long)"
	@echo "make setup            install the Debian packages (system) and the venv"
	@echo "make system           install the Debian packages natmig needs (apt-get, only those missing)"
	@echo "make venv             create .venv with natmig installed in editable mode"
	@echo "make bindings         regenerate bindings/ from yang/ with pyangbind"
	@echo "make tree             print the module's tree diagram (pyang -f tree)"
	@echo "make lint             check the YANG modules (pyang --lint, yanglint)"
	@echo "make man              regenerate man/natmig.1 and the bash/zsh completions from the parsers"
	@echo "make install-man-venv put the man page and completions into .venv/share (make venv does it)"
	@echo "make install-systemd  install the natmig-agent@.service and natmig-controller.service units and an example agent config"
	@echo "make clean            remove .venv and build leftovers"
	@echo "make help             this list"

setup: system venv

# Packaged services must never start (Open vSwitch's, conntrackd's): natmig
# runs its own daemons with private files.  invoke-rc.d asks policy-rc.d;
# one that exits 101 ("action forbidden") is put in place for the install
# when the machine has none, and removed afterwards (one already there is
# left as it is).
system:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		export DEBIAN_FRONTEND=noninteractive; \
		policy=/usr/sbin/policy-rc.d; own=; \
		if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' > $$policy && chmod 0755 $$policy && own=1; fi; \
		apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; rc=$$?; \
		if [ -n "$$own" ]; then rm -f $$policy; fi; \
		exit $$rc; \
	fi

# The venv is rebuilt only when pyproject.toml changes.
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test,bench,docs]'
	@$(MAKE) -s install-man-venv
	@touch $@

# An editable install skips pyproject's data-files (a wheel has them): put the
# manual page and completions where the venv's man and shells find them.
install-man-venv:
	install -D -m 0644 man/natmig.1 $(VENV)/share/man/man1/natmig.1
	install -D -m 0644 completion/natmig $(VENV)/share/bash-completion/completions/natmig
	install -D -m 0644 completion/_natmig $(VENV)/share/zsh/site-functions/_natmig

test: setup typecheck
	$(PY) -m pytest

test-unit: venv
	$(PY) -m pytest -m 'not root and not faults'

# mypy on natmig's packages as they install: pyproject's package-dir maps
# agent/, controller/ and testbed/ into natmig, which mypy cannot see from the
# source tree, so it checks a tree of links that has that shape.  bindings/
# (pyangbind's generated code) is left out.  Configuration: [tool.mypy].
TYPECHECK := build/typecheck
typecheck: venv
	@rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/natmig
	@for f in natmig/*; do case $$f in */__pycache__) ;; *) ln -s $(CURDIR)/$$f $(TYPECHECK)/natmig/ ;; esac; done
	@for d in agent controller testbed; do ln -s $(CURDIR)/$$d $(TYPECHECK)/natmig/$$d; done
	cd $(TYPECHECK) && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml --cache-dir $(CURDIR)/build/mypy-cache -p natmig

# The fault-injection suite (root): migrations killed anywhere, agents killed, two at once, either engine (~10 min).
faults: setup
	$(PY) -m pytest -m faults tests/functional

# Benchmarks run from bench/out/, where those that write files (JSON, PNG) leave them.
# Every benchmark runs; the exit status says whether any missed a target or failed.
bench: setup
	@mkdir -p bench/out
	@failed=""; for b in bench/bench_*.py; do echo "== $$b"; 		(cd bench/out && $(CURDIR)/$(PY) $(CURDIR)/$$b) || failed="$$failed $$b"; done; 	if [ -n "$$failed" ]; then echo "benchmarks that missed a target or failed:$$failed"; exit 1; fi

# The migration benchmark at 1,000,000 sessions (make bench stops at 100,000):
# its row joins those of the other sizes in bench/out/bench_migrate.json.  The
# RPC and confirm timeouts are those a move of 1M needed here (docs/testbed.md):
# with the default 30 s the source's get-config of the whole table times out.
bench-large: setup
	@mkdir -p bench/out
	cd bench/out && $(CURDIR)/$(PY) $(CURDIR)/bench/bench_migrate.py --sizes 1000000 --merge

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
	$(PYANG) --lint -p yang yang/nat-session.yang yang/natmig-state.yang yang/natmig-controller.yang yang/fw-state.yang examples/lb-binding.yang
	yanglint -p yang yang/nat-session.yang yang/natmig-state.yang yang/natmig-controller.yang yang/fw-state.yang examples/lb-binding.yang

# The manual page and completions are generated from the argparse parsers
# (natmig/manual.py) and installed with the package (pyproject's data-files).
man: venv
	$(PY) -m natmig.manual
	@$(MAKE) -s install-man-venv

# The agent as a systemd service (docs/agent.md): the unit template, with this
# checkout's natmig and the config directory filled in, and an example config.
SYSTEMD_DIR ?= /etc/systemd/system
SYSCONFDIR ?= /etc
NATMIG ?= $(abspath $(VENV))/bin/natmig

install-systemd: venv
	install -d $(SYSTEMD_DIR) $(SYSCONFDIR)/natmig/agent
	sed -e 's|@NATMIG@|$(NATMIG)|g' -e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' systemd/natmig-agent@.service.in > $(SYSTEMD_DIR)/natmig-agent@.service
	chmod 0644 $(SYSTEMD_DIR)/natmig-agent@.service
	sed -e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' systemd/agent.toml.example > $(SYSCONFDIR)/natmig/agent/agent.toml.example
	sed -e 's|@NATMIG@|$(NATMIG)|g' -e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' systemd/natmig-controller.service.in > $(SYSTEMD_DIR)/natmig-controller.service
	chmod 0644 $(SYSTEMD_DIR)/natmig-controller.service
	@if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed $(SYSTEMD_DIR)/natmig-agent@.service; configure $(SYSCONFDIR)/natmig/agent/NAME.toml, then: systemctl enable --now natmig-agent@NAME"
	@echo "installed $(SYSTEMD_DIR)/natmig-controller.service; configure $(SYSCONFDIR)/natmig/controller.toml, then: systemctl enable --now natmig-controller"

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
