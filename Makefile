# Two commands on a fresh machine:  `make train` (set up, then the default 2-process CPU training job: SM3 and AdamW
# at their defaults, one plot of held-out loss)
# and `make test` (set up, then the full test suite). Both create .venv from this repository's own files.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch as pinned here, from the indexes pip's configuration names (the CPU wheel on this project's CI machine; PyPI's
# Linux x86-64 build is the CUDA one); users may install any torch in the range pyproject.toml allows.
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?= -n 2

.PHONY: setup test test-aarch64 train bench lint gpu-wheels

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: $(VENV)/.installed
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# the native kernel's aarch64 (NEON) build under qemu, bitwise against the eager kernel (installs
# g++-aarch64-linux-gnu and qemu-user with apt-get when missing; not in CI: the install takes minutes)
test-aarch64: $(VENV)/.installed
	PY=$(PY) tools/test_aarch64.sh

train: $(VENV)/.installed
	$(VENV)/bin/sm3-dist train --compare sm3,adamw

bench: $(VENV)/.installed
	$(VENV)/bin/sm3-dist bench

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# every wheel the offline GPU machine lacks (../shared/GPU.md), into .whl/: carry that folder with the repository
gpu-wheels: $(VENV)/.installed
	PIP="$(PY) -m pip" bash tools/gpu_wheels.sh .whl
