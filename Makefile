# Two commands for a new user: `make demo` (the main job on the embedded data) and `make test`.
# Install order is machine specific and lives here, not in pyproject.toml:
# clean-fid imports torchvision at import time; on this CPU-only machine kind the only torch /
# torchvision pair that imports together is torch 2.14.1 + torchvision 0.29.1 (CUDA builds that
# run on the CPU). On a GPU machine set TORCH_SPEC to whatever matches its CUDA.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,demo]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/run_demo.py --output_dir outputs

# One pytest-xdist worker per core (the tiny models run single-threaded); a file's tests stay on one worker.
TEST_WORKERS ?= 2
test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile tests

lint: install
	$(PY) -m ruff check dp_diffusers training_scripts tests examples benchmarks

bench: install
	$(PY) benchmarks/bench_dp_step.py

clean:
	rm -rf outputs .cache
