# The two commands a newcomer needs: `make run` and `make test`. Everything else installs itself.
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test test-vm lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# DEMO_FLAGS: e.g. `--slowdown 10` on a host ten times slower (make test-vm's emulated VM).
run: $(STAMP)
	$(PYTHON) -m sandbox.demo skills_examples $(DEMO_FLAGS)

test: lint
	$(PYTHON) -m pytest

# Boots this machine's userland under Debian's 6.1 kernel with cgroup v2 only (emulated, about
# 10x slower) and runs the host-dependent tests and the examples there: see .ci/test-vm.
test-vm: $(STAMP)
	.ci/test-vm

lint: $(STAMP)
	$(VENV)/bin/ruff check sandbox worker tests benchmarks skills_examples
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PYTHON) -m benchmarks

clean:
	rm -rf $(VENV) .venv-vm .pytest_cache .mypy_cache .ruff_cache
