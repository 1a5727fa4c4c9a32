# reactlearn: two commands.  `make run` (playground, or Discord/Slack when tokens are set)
# and `make test` (the whole suite; .ci/run calls exactly this). `make bench` measures.
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= $(wildcard reactlearn.toml)
CONFIG_FLAG := $(if $(CONFIG),--config $(CONFIG))

.PHONY: setup model run test bench clean

setup: $(VENV)/.installed

# torch first, pinned: it installs the CPU build from the local file; the project's own
# requirement is a range that this version satisfies, so nothing bigger is pulled in.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# Fetch and convert the default model once (cached in ~/.cache/reactlearn).
model: setup
	$(PY) -m bot.models $(CONFIG_FLAG)

run: setup model
	$(PY) -m bot --with-trainer $(CONFIG_FLAG)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

# The benchmark suite (bench/__init__.py lists it; not part of `make test`). Results in bench/out/.
# Some, or shorter: make bench BENCH="reply load --duration 10"
BENCH ?=
bench: setup model
	$(PY) -m bench $(BENCH) $(CONFIG_FLAG)

clean:
	rm -rf $(VENV) .pytest_cache
