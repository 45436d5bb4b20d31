# Two commands do all set-up on a fresh machine:
#   make demo   create .venv if missing, install, run the main job on the embedded default
#   make test   create .venv if missing, install, run the whole test suite
# Developer tools (requirements-dev.txt, installed on first use):
#   make lint   ruff (pyflakes + bugbear, pyproject.toml); CI runs it with the tests
#   make format pyink over the tree (Google style: 2-space indents, 100 columns)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)
DEV_STAMP := $(VENV)/.dev-installed-$(shell cksum requirements-dev.txt | cut -d' ' -f1)

.PHONY: demo test test-fast bench install lint format clean

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $@

$(DEV_STAMP): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	rm -f $(VENV)/.dev-installed-*
	touch $@

lint: $(DEV_STAMP)
	$(PY) -m ruff check .

format: $(DEV_STAMP)
	$(PY) -m pyink .

demo: $(STAMP)
	$(PY) launch.py --config=configs/synthetic.py --workdir=runs/demo --mode=demo $(if $(RETRAIN),--overwrite)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) benchmarks/mano_forward.py
	$(PY) benchmarks/render.py
	$(PY) benchmarks/input_pipeline.py
	$(PY) benchmarks/sampling.py

clean:
	rm -rf runs .pytest_cache
