# AMP Workbook. `make sweep` runs the main job, `make test` the checks; both set up .venv first.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch
# An NVIDIA GPU here? Read from the driver's files, so nothing is started. Without one, torch comes from PyTorch's
# CPU index (PyPI's Linux torch is the CUDA build: gigabytes of libraries a CPU cannot use). TORCH_INDEX= (empty):
# the default index, or a local wheel pip is configured to find, decides which build TORCH_SPEC gets.
NVIDIA_GPU  ?= $(wildcard /dev/nvidia[0-9]* /proc/driver/nvidia/gpus/*)
TORCH_INDEX ?= $(if $(strip $(NVIDIA_GPU)),,https://download.pytorch.org/whl/cpu)
# Extras installed with the project for `make sweep`/`lab`/`bench` (`make test` adds dev, which has them all):
# on an NVIDIA GPU, fp8 training (torchao) and energy readings (nvidia-ml-py).
EXTRAS     ?= $(if $(strip $(NVIDIA_GPU)),fp8$(comma)energy)
KERNEL     ?= amp-workbook
# pytest-xdist processes for `make test`/`test-fast`: test files are handed out whole (--dist loadfile),
# longest first (tests/conftest.py), so a module's Ray instance, Slurm cluster or torchrun job starts once.
# One more than the 2 cores CI has: the slow tier waits a lot (a Slurm time limit, Ray's start-up, kernels,
# torchrun's timeouts), and a third worker fills those waits. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 3
SWEEP_ARGS ?=
BENCH_ARGS ?=
# `make lab`: the folder JupyterLab opens; a --ServerApp.root_dir (or --notebook-dir) in LAB_ARGS wins.
LAB_ROOT   ?= notebooks
LAB_ARGS   ?=
# `make mutation MODULE=amp_lib/report.py`: the module to mutate (against its own test file).
MODULE     ?=
MUTATION_JOBS ?= 2
PY         := $(VENV)/bin/python
comma      := ,
export WANDB_MODE  ?= offline
export WANDB_SILENT ?= true

# Three stamps, each a file in .venv. The first two hold what they installed; when that differs from what is
# asked for now, the stamp is out of date (declared phony) and its step runs again:
#   .torch          TORCH_SPEC and TORCH_INDEX: a change reinstalls torch, and only torch
#   .installed      the project (editable) with EXTRAS, and the Jupyter kernel: what a sweep needs
#   .installed-dev  the dev extra (test tools, every optional extra): what `make test` needs
# The last two also re-run when pyproject.toml changes.
TORCH_STAMP   := $(VENV)/.torch
STAMP         := $(VENV)/.installed
DEV_STAMP     := $(VENV)/.installed-dev
TORCH_REQUEST := $(strip $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)))
TORCH_ARGS    := "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
PROJECT       := .$(if $(strip $(EXTRAS)),[$(strip $(EXTRAS))])
ifneq ($(shell cat $(TORCH_STAMP) 2>/dev/null),$(TORCH_REQUEST))
.PHONY: $(TORCH_STAMP)
endif
ifneq ($(shell cat $(STAMP) 2>/dev/null),$(PROJECT))
.PHONY: $(STAMP)
endif

.PHONY: setup setup-dev test test-fast goldens sweep lab bench mutation clean

setup: $(STAMP)

setup-dev: $(DEV_STAMP)

# --force-reinstall: another build of the same version (CUDA -> CPU) counts as a change; pip downloads before it
# uninstalls, so a failed download leaves the old torch in place. The second call adds torch's dependencies.
$(TORCH_STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --force-reinstall --no-deps $(TORCH_ARGS)
	$(PY) -m pip install --quiet $(TORCH_ARGS)
	echo '$(TORCH_REQUEST)' > $@

$(STAMP): pyproject.toml | $(TORCH_STAMP)
	$(PY) -m pip install --quiet -e '$(PROJECT)'
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "AMP Workbook (Python 3)"
	echo '$(PROJECT)' > $@

$(DEV_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Everything: unit tests, slow and notebook tiers, nbval over notebooks/, the 90% line+branch coverage gate.
test: setup-dev
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --nbval-lax --cov=amp_lib --cov-branch --cov-report=term-missing:skip-covered --cov-fail-under=90

# The quick tier while editing: no training beyond a few steps, no kernels, no W&B/Lightning runs.
test-fast: setup-dev
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow and not notebook and not gpu" -q

# Rewrite tests/golden/* from the current code; review the diff before committing it.
goldens: setup-dev
	$(PY) -m pytest tests -q --update-goldens -k golden

# Three seeds: one seed has no noise estimate, so no parity verdict (SWEEP_ARGS="--seeds 0" overrides).
sweep: setup
	$(PY) -m amp_lib.sweep --out sweeps/default --seeds 0,1,2 $(SWEEP_ARGS)

# JupyterLab on LAB_ROOT (notebooks/) with the project's kernel as the default for new notebooks (train, compare
# and explore name it already). Jupyter refuses to run as root unless told: containers often run as root.
# LAB_ARGS: more options, e.g. LAB_ARGS="--no-browser --port 8899"; a root_dir of its own replaces LAB_ROOT.
LAB_ROOT_ARG = $(if $(findstring root_dir,$(LAB_ARGS))$(findstring notebook-dir,$(LAB_ARGS)),,--ServerApp.root_dir=$(LAB_ROOT))
lab: setup
	$(VENV)/bin/jupyter lab $(LAB_ROOT_ARG) --MappingKernelManager.default_kernel_name=$(KERNEL) \
		$(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

bench: setup
	$(PY) -m amp_lib.bench $(BENCH_ARGS)

# Mutation testing (docs/testing.md): mutmut mutates MODULE and runs its own test file, tests/test_<module>.py
# (amp_lib/sweep/grid.py: tests/test_sweep_grid.py), in mutants/<module>/ on a copy of pyproject.toml that appends
# the two to [tool.mutmut]. A run over unchanged files resumes; once the module, its test file or pyproject.toml
# changed, the folder starts afresh (mutmut would measure coverage against its stale copy).
# Slow (minutes to hours on 2 cores) and timed by the wall clock: run it on an otherwise idle machine.
MUTATION_NAME  = $(subst /,_,$(patsubst amp_lib/%.py,%,$(MODULE)))
MUTATION_TESTS = tests/test_$(MUTATION_NAME).py
MUTATION_DIR   = mutants/$(MUTATION_NAME)
MUTMUT         = $(abspath $(VENV))/bin/mutmut
ifneq ($(filter mutation,$(MAKECMDGOALS)),)
ifeq ($(and $(wildcard $(MODULE)),$(wildcard $(MUTATION_TESTS))),)
$(error usage: make mutation MODULE=amp_lib/<module>.py, mutated against tests/test_<module>.py; got MODULE='$(MODULE)')
endif
endif

mutation: setup-dev $(MUTATION_DIR)/pyproject.toml
	cd $(MUTATION_DIR) && OMP_NUM_THREADS=1 $(MUTMUT) run --max-children $(MUTATION_JOBS)
	cd $(MUTATION_DIR) && $(MUTMUT) results

$(MUTATION_DIR)/pyproject.toml: pyproject.toml $(MODULE) $(MUTATION_TESTS)
	rm -rf $(MUTATION_DIR) && mkdir -p $(MUTATION_DIR)
	for path in amp_lib tests notebooks scripts; do ln -s ../../$$path $(MUTATION_DIR)/$$path; done
	{ cat pyproject.toml; echo 'only_mutate = ["$(MODULE)"]'; \
		echo 'pytest_add_cli_args_test_selection = ["$(MUTATION_TESTS)"]'; } > $@

clean:
	rm -rf $(VENV) sweeps .pytest_cache .coverage htmlcov mutants
