# flowdiff: make install | demo | test | test-slow | lint | bench
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install demo test test-slow lint bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip

# torch and torchvision first, at the versions this machine serves from disk (a CPU-only machine
# still gets the CUDA build of 2.14.1 from PyPI's index; it runs on the CPU).
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/flowdiff fit --config configs/toy.yaml --trainer.default_root_dir $(DEMO_DIR)
	$(VENV)/bin/flowdiff sample --ckpt $(DEMO_DIR)/checkpoints/last.ckpt --num-samples 5000
	@echo "demo: pictures in $(DEMO_DIR)/samples"

test: $(STAMP)
	$(VENV)/bin/pytest -q

test-slow: $(STAMP)
	$(VENV)/bin/pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check flowdiff tests bench
	$(VENV)/bin/ruff format --check flowdiff tests bench

bench: $(STAMP)
	$(PY) bench/toy_throughput.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
