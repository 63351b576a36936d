# The two commands a newcomer needs: `make run` and `make test`. Everything else installs itself.
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test test-vm lint bench clean redis

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# DEMO_FLAGS: e.g. `--slowdown 10` on a host ten times slower (make test-vm's emulated VM).
run: $(STAMP)
	$(PYTHON) -m sandbox.demo skills_examples $(DEMO_FLAGS)

test: lint redis
	$(PYTHON) -m pytest

# The fleet's tests (and `make bench`'s fleet rows) start their own redis-server on 127.0.0.1:
# Debian's package, installed here when missing (as root, with apt-get). The package's own
# service is not wanted: each test starts, and stops, a private one on a free loopback port.
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "make: installing Debian's redis-server for the fleet tests"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null 2>&1 || \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; } || \
	    echo "make: could not install redis-server: the fleet tests will skip" >&2; \
	  else \
	    echo "make: redis-server is missing and cannot be installed here (needs root and" \
	         "apt-get): the fleet tests will skip; install Debian's redis-server package" >&2; \
	  fi; }

# Boots this machine's userland under Debian's 6.1 kernel with cgroup v2 only (emulated, about
# 10x slower) and runs the host-dependent tests and the examples there: see .ci/test-vm.
test-vm: $(STAMP)
	.ci/test-vm

lint: $(STAMP)
	$(VENV)/bin/ruff check sandbox worker tests benchmarks skills_examples
	$(VENV)/bin/mypy

bench: $(STAMP) redis
	$(PYTHON) -m benchmarks

clean:
	rm -rf $(VENV) .venv-vm .pytest_cache .mypy_cache .ruff_cache
