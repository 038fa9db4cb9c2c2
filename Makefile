# The README's two commands: `make demo` and `make test`. Both create/reuse .venv; torch comes first and stays
# pinned by constraints.txt, so nothing can swap in another build. TORCH_INDEX_URL picks where that torch comes
# from (e.g. https://download.pytorch.org/whl/cpu for the CPU build; empty: pip's own indexes and wheel dirs).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_INDEX_URL ?=
EXTRAS ?= dev
# The tests cover the optional readers and the simulator too, so `make test` installs those extras
# (≈ 2 min more on a fresh machine); the demo needs none of them.
TEST_EXTRAS ?= dev,rlds,libero
DEMO_EXTRAS ?= dev
HASH := $(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
stamp = $(VENV)/.installed-$(HASH)-$(1)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-all lint clean tabletop-data

install: $(call stamp,$(EXTRAS))

# One stamp per set of extras; a change to pyproject.toml or constraints.txt invalidates them all.
$(VENV)/.installed-$(HASH)-%: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL),)
	$(PIP) install -q -c constraints.txt -e ".[$*]"
	@find $(VENV) -maxdepth 1 -name '.installed-*' ! -name '.installed-$(HASH)-*' -delete
	@touch $@

demo: $(call stamp,$(DEMO_EXTRAS))
	$(PY) -m experiments.robot.demo $(if $(filter 1 true yes,$(QUICK)),--quick true,)

tabletop-data: $(call stamp,$(DEMO_EXTRAS))
	$(PY) -m experiments.robot.tabletop.generate

test: $(call stamp,$(TEST_EXTRAS))
	$(PY) -m pytest -q

test-all: $(call stamp,$(TEST_EXTRAS))
	$(PY) -m pytest -q -m "slow or not slow"

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
