# AMP Workbook. `make sweep` runs the main job, `make test` the checks; both set up .venv first.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch
# A package index for torch only, e.g. https://download.pytorch.org/whl/cpu (PyTorch's CPU builds: no CUDA
# download). Empty: the default index (or a local wheel) decides which build TORCH_SPEC gets.
TORCH_INDEX ?=
KERNEL     ?= amp-workbook
# pytest-xdist processes for `make test`/`test-fast`: test files are handed out whole (--dist loadfile),
# longest first (tests/conftest.py), so a module's Ray instance, Slurm cluster or torchrun job starts once.
# One more than the 2 cores CI has: the slow tier waits a lot (a Slurm time limit, Ray's start-up, kernels,
# torchrun's timeouts), and a third worker fills those waits. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 3
SWEEP_ARGS ?=
BENCH_ARGS ?=
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
export WANDB_MODE  ?= offline
export WANDB_SILENT ?= true

.PHONY: setup test test-fast goldens sweep lab bench mutation clean

setup: $(STAMP)

# Re-runs only when .venv is missing or pyproject.toml changed since the last install.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "AMP Workbook (Python 3)"
	touch $(STAMP)

# Everything: unit tests, slow and notebook tiers, nbval over notebooks/, the 90% line+branch coverage gate.
test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --nbval-lax --cov=amp_lib --cov-branch --cov-report=term-missing:skip-covered --cov-fail-under=90

# The quick tier while editing: no training beyond a few steps, no kernels, no W&B/Lightning runs.
test-fast: setup
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow and not notebook and not gpu" -q

# Rewrite tests/golden/* from the current code; review the diff before committing it.
goldens: setup
	$(PY) -m pytest tests -q --update-goldens -k golden

# Three seeds: one seed has no noise estimate, so no parity verdict (SWEEP_ARGS="--seeds 0" overrides).
sweep: setup
	$(PY) -m amp_lib.sweep --out sweeps/default --seeds 0,1,2 $(SWEEP_ARGS)

# JupyterLab on notebooks/ with the project's kernel as the default for new notebooks (train, compare and
# explore name it already). Jupyter refuses to run as root unless told: containers often run as root.
# LAB_ARGS: more options, e.g. LAB_ARGS="--no-browser --port 8899".
lab: setup
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=notebooks --MappingKernelManager.default_kernel_name=$(KERNEL) \
		$(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

bench: setup
	$(PY) -m amp_lib.bench $(BENCH_ARGS)

# Mutation testing (docs/testing.md): mutmut over the modules listed in pyproject's [tool.mutmut].
# Resumes where a previous run stopped; `rm -rf mutants` starts over. Not part of .ci/run (slow).
mutation: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(or $(MUTATION_JOBS),2); \
	$(PY) scripts/mutation_score.py

clean:
	rm -rf $(VENV) sweeps .pytest_cache .coverage htmlcov mutants
