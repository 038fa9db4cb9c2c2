# The README's two commands: `make demo` and `make test`. Both create/reuse .venv; torch comes first from
# its CPU wheel and stays pinned by constraints.txt, so nothing can swap in a CUDA build.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
EXTRAS ?= dev
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)-$(EXTRAS)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-all lint clean tabletop-data

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[$(EXTRAS)]"
	@rm -f $(VENV)/.installed-* && touch $@

demo: install
	$(PY) -m experiments.robot.demo $(if $(QUICK),--quick true,)

tabletop-data: install
	$(PY) -m experiments.robot.tabletop.generate

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m "slow or not slow"

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
