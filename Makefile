# Two commands do all set-up on a fresh machine:
#   make demo   create .venv if missing, install, run the main job on the embedded default
#   make test   create .venv if missing, install, run the whole test suite
# Developer tools (requirements-dev.txt, installed on first use):
#   make lint   ruff (pyflakes + bugbear) and pyink --check (pyproject.toml); CI runs it
#   make format pyink over the tree (Google style: 2-space indents, 100 columns)
# Optional extra (PyTorch + timm, ~6 GB): `make test-torch` creates .venv-torch and runs the
# weight-import tests against timm; CI runs it after `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)
DEV_STAMP := $(VENV)/.dev-installed-$(shell cksum requirements-dev.txt | cut -d' ' -f1)

.PHONY: demo test test-fast test-torch venv-torch bench install lint format clean

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
	$(PY) -m pyink --check --quiet .

format: $(DEV_STAMP)
	$(PY) -m pyink .

# .venv-torch is layered over .venv: a .pth file puts .venv's site-packages on its path, so
# jax/flax come from the main install and only torch/timm land here (the main venv never gets
# torch). `-c requirements.txt` pins shared dependencies (numpy, pillow) to the main versions
# so nothing installed here shadows them.
TORCH_VENV ?= .venv-torch
TORCH_PY := $(TORCH_VENV)/bin/python
TORCH_STAMP := $(TORCH_VENV)/.installed-$(shell cksum requirements.txt requirements-torch.txt | cksum | cut -d' ' -f1)
SITE_PACKAGES := import sysconfig; print(sysconfig.get_paths()['purelib'])

venv-torch: $(TORCH_STAMP)

$(TORCH_STAMP): requirements-torch.txt $(STAMP)
	test -x $(TORCH_PY) || $(PYTHON) -m venv $(TORCH_VENV)
	$(PY) -c "$(SITE_PACKAGES)" > "$$($(TORCH_PY) -c "$(SITE_PACKAGES)")/main-venv.pth"
	$(TORCH_PY) -m pip install -q -c requirements.txt -r requirements-torch.txt
	rm -f $(TORCH_VENV)/.installed-*
	touch $@

test-torch: $(TORCH_STAMP)
	$(TORCH_PY) -m pytest -q tests/test_weights_timm.py \
	    tests/test_encoders.py::test_resample_matches_pytorch_when_installed \
	    tests/test_torch_reference.py

# The demo turns the CPU tools on: huge pages for XLA CPU buffers, the lowered step kept on disk.
demo: $(STAMP)
	$(PY) launch.py --config=configs/synthetic.py --workdir=runs/demo --mode=demo \
	    --huge_pages --config.train.step_cache=True $(if $(RETRAIN),--overwrite)

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q --durations=25 -m "not slow" tests

bench: export DIFFHAND_HUGE_PAGES = 1
bench: $(STAMP)
	$(PY) benchmarks/mano_forward.py
	$(PY) benchmarks/render.py
	$(PY) benchmarks/input_pipeline.py
	$(PY) benchmarks/sampling.py
	$(PY) benchmarks/metrics.py --repeats=2
	$(PY) benchmarks/cpu_kernels.py

clean:
	rm -rf runs .pytest_cache
