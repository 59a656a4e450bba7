"""The set-up contract: one dependency list in two files, and a Makefile/CI that use it."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower()


def _environment_pip_list() -> list[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    items = []
    for line in lines[start + 1 :]:
        match = re.match(r"^\s+- (.+)$", line)
        if not match:
            break
        items.append(match.group(1).strip())
    return items


def test_environment_yml_lists_the_same_dependencies_as_pyproject() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(_environment_pip_list()) == sorted(deps), "environment.yml and pyproject.toml drifted apart"


def test_core_dependencies_are_what_the_workbook_runs_on_and_test_tools_are_dev_only() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {_name(d) for d in project["dependencies"]}
    assert "torch>=2.4" in project["dependencies"]
    assert deps >= {"torch", "numpy", "matplotlib", "tqdm", "papermill", "ipykernel", "jupyterlab", "wandb"}
    test_tools = {"nbval", "pytest", "pytest-cov", "pytest-randomly", "pytest-timeout", "mutmut", "ruff"}
    assert not deps & test_tools, f"test tools among the runtime dependencies: {sorted(deps & test_tools)}"
    assert {_name(d) for d in project["optional-dependencies"]["dev"]} >= test_tools - {"pytest-timeout"} | {
        "lightning"
    }


def test_fp8_and_energy_are_extras_and_the_dev_extra_holds_every_extra() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["fp8"] == ["torchao>=0.18"] and extras["energy"] == ["nvidia-ml-py"]
    for name, requirements in extras.items():
        assert set(requirements) <= set(extras["dev"]), name  # so the tests cover what every extra adds


def test_every_subpackage_is_packaged() -> None:
    packaged = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {p.parent.relative_to(ROOT).as_posix().replace("/", ".") for p in (ROOT / "amp_lib").rglob("__init__.py")}
    assert packaged == on_disk


def test_ci_runs_the_readme_test_command_with_torch_from_pips_own_indexes(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make sweep" in readme
    stand_in = tmp_path / "bin" / "make"  # records what .ci/run asks make for
    stand_in.parent.mkdir()
    stand_in.write_text('#!/bin/sh\nprintf "%s|" "$@" > "$CALLS"\n')
    stand_in.chmod(0o755)
    env = {"PATH": f"{stand_in.parent}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls")}
    subprocess.run(["bash", str(ROOT / ".ci" / "run")], env=env, check=True, timeout=30)
    # CI reaches PyPI only: torch must not come from the CPU index the Makefile defaults to without a GPU
    assert (tmp_path / "calls").read_text() == "test|TORCH_SPEC=torch==2.13.0|TORCH_INDEX=|"


# --- the Makefile, run for real over a stand-in .venv whose tools record what they are asked to do ---

STAND_IN = '#!/bin/sh\necho "$(basename "$0") $*" >> "$(dirname "$0")/../calls"\n'
TORCH_2_13 = [
    "python -m pip install --quiet --upgrade pip",
    f"python -m pip install --quiet --force-reinstall --no-deps torch==2.13.0 --index-url {CPU_INDEX}",
    f"python -m pip install --quiet torch==2.13.0 --index-url {CPU_INDEX}",
]
PROJECT_AND_KERNEL = [
    "python -m pip install --quiet -e .",
    "python -m ipykernel install --sys-prefix --name amp-workbook --display-name AMP Workbook (Python 3)",
]


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the Makefile and pyproject.toml beside a .venv of stand-ins (python, jupyter, mutmut)."""
    if shutil.which("make") is None:
        pytest.skip("needs make")
    root = tmp_path / "checkout"
    (root / ".venv" / "bin").mkdir(parents=True)
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(ROOT / name, root / name)
    for tool in ("python", "jupyter", "mutmut"):
        (root / ".venv" / "bin" / tool).write_text(STAND_IN)
        (root / ".venv" / "bin" / tool).chmod(0o755)
    return root


def make(root: Path, *args: str) -> list[str]:
    """Runs make in `root` with nothing from this environment (not the MAKEFLAGS of a `make test` above us);
    returns the commands the .venv's tools received."""
    calls = root / ".venv" / "calls"
    calls.unlink(missing_ok=True)
    done = subprocess.run(
        ["make", "--no-print-directory", *args], cwd=root, env={"PATH": os.environ["PATH"]},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return calls.read_text().splitlines() if calls.exists() else []


def test_make_sweep_installs_torch_the_project_and_its_kernel_but_not_the_test_tools(checkout: Path) -> None:
    calls = make(checkout, "sweep", "NVIDIA_GPU=", "TORCH_SPEC=torch==2.13.0")
    assert calls == [*TORCH_2_13, *PROJECT_AND_KERNEL, "python -m amp_lib.sweep --out sweeps/default --seeds 0,1,2"]
    assert make(checkout, "setup", "NVIDIA_GPU=", "TORCH_SPEC=torch==2.13.0") == []  # installed: nothing to do


def test_make_test_after_make_sweep_adds_the_dev_extra_alone(checkout: Path) -> None:
    make(checkout, "setup", "NVIDIA_GPU=", "TORCH_SPEC=torch==2.13.0")
    calls = make(checkout, "test", "NVIDIA_GPU=", "TORCH_SPEC=torch==2.13.0")
    assert calls[0] == "python -m pip install --quiet -e .[dev]"
    assert [c.split()[:3] for c in calls[1:]] == [["python", "-m", "pytest"]]
    assert make(checkout, "test-fast", "NVIDIA_GPU=", "TORCH_SPEC=torch==2.13.0")[0].startswith("python -m pytest")


def test_a_change_of_torch_spec_or_index_reinstalls_torch_and_only_torch(checkout: Path) -> None:
    make(checkout, "setup-dev", "NVIDIA_GPU=", "TORCH_SPEC=torch==2.13.0")
    calls = make(checkout, "setup-dev", "NVIDIA_GPU=", "TORCH_SPEC=torch==2.12.0")
    assert calls == [c.replace("2.13.0", "2.12.0") for c in TORCH_2_13]
    calls = make(checkout, "setup-dev", "NVIDIA_GPU=", "TORCH_SPEC=torch==2.12.0", "TORCH_INDEX=")
    assert calls == [c.replace("2.13.0", "2.12.0").replace(f" --index-url {CPU_INDEX}", "") for c in TORCH_2_13]
    assert make(checkout, "setup-dev", "NVIDIA_GPU=", "TORCH_SPEC=torch==2.12.0", "TORCH_INDEX=") == []
    # and back: the CUDA build installed last is replaced by the CPU one, not kept because the version matches
    assert make(checkout, "setup-dev", "NVIDIA_GPU=", "TORCH_SPEC=torch==2.12.0")[1].endswith(CPU_INDEX)


def test_a_changed_pyproject_reinstalls_the_project_but_not_torch(checkout: Path) -> None:
    make(checkout, "setup-dev", "NVIDIA_GPU=", "TORCH_SPEC=torch==2.13.0")
    later = time.time() + 5
    os.utime(checkout / "pyproject.toml", (later, later))
    calls = make(checkout, "setup-dev", "NVIDIA_GPU=", "TORCH_SPEC=torch==2.13.0")
    assert calls == [*PROJECT_AND_KERNEL, "python -m pip install --quiet -e .[dev]"]


def test_with_an_nvidia_gpu_torch_comes_from_the_default_index_with_the_fp8_and_energy_extras(checkout: Path) -> None:
    calls = make(checkout, "setup", "NVIDIA_GPU=/dev/nvidia0", "TORCH_SPEC=torch==2.13.0")
    assert calls[1:4] == [
        "python -m pip install --quiet --force-reinstall --no-deps torch==2.13.0",
        "python -m pip install --quiet torch==2.13.0",
        "python -m pip install --quiet -e .[fp8,energy]",
    ]
    assert make(checkout, "setup", "NVIDIA_GPU=/dev/nvidia0", "TORCH_SPEC=torch==2.13.0", "EXTRAS=") == [
        *PROJECT_AND_KERNEL  # other extras asked for: the project is installed again with those
    ]


def test_the_gpu_is_read_from_the_nvidia_drivers_files(checkout: Path) -> None:
    gpu = [*Path("/dev").glob("nvidia[0-9]*"), *Path("/proc/driver/nvidia/gpus").glob("*")]
    calls = make(checkout, "setup", "TORCH_SPEC=torch==2.13.0")
    assert calls[1].endswith(f"--index-url {CPU_INDEX}") is not bool(gpu)


def test_make_lab_opens_notebooks_unless_the_user_names_another_root(checkout: Path) -> None:
    make(checkout, "setup", "NVIDIA_GPU=", "TORCH_SPEC=torch==2.13.0")
    (lab,) = make(checkout, "lab", "NVIDIA_GPU=", "TORCH_SPEC=torch==2.13.0")
    assert lab.startswith("jupyter lab --ServerApp.root_dir=notebooks --MappingKernelManager.default_kernel_name=")
    for args in ("--ServerApp.root_dir=/srv/mine --no-browser", "--notebook-dir=/srv/mine"):
        (lab,) = make(checkout, "lab", "NVIDIA_GPU=", "TORCH_SPEC=torch==2.13.0", f"LAB_ARGS={args}")
        assert "notebooks" not in lab and lab.count("/srv/mine") == 1 and lab.endswith(args)
    (lab,) = make(checkout, "lab", "NVIDIA_GPU=", "TORCH_SPEC=torch==2.13.0", "LAB_ROOT=/srv/mine")
    assert "--ServerApp.root_dir=/srv/mine " in lab


def test_make_mutation_runs_one_module_against_its_own_test_file_in_a_folder_of_its_own(checkout: Path) -> None:
    for path in ("amp_lib/sweep/grid.py", "tests/test_sweep_grid.py", "notebooks/train.ipynb", "scripts/x.sh"):
        (checkout / path).parent.mkdir(parents=True, exist_ok=True)
        (checkout / path).write_text("")
    args = ("NVIDIA_GPU=", "TORCH_SPEC=torch==2.13.0", "MODULE=amp_lib/sweep/grid.py")
    make(checkout, "setup-dev", *args[:2])
    calls = make(checkout, "mutation", *args)
    assert calls == ["mutmut run --max-children 2", "mutmut results"]  # no score step, nothing else
    work = checkout / "mutants" / "sweep_grid"
    config = tomllib.loads((work / "pyproject.toml").read_text())["tool"]["mutmut"]
    assert config["only_mutate"] == ["amp_lib/sweep/grid.py"]
    assert config["pytest_add_cli_args_test_selection"] == ["tests/test_sweep_grid.py"]
    assert "not notebook and not gpu" in config["pytest_add_cli_args"]
    for name in ("amp_lib", "tests", "notebooks", "scripts"):
        assert (work / name).resolve() == checkout / name
    (work / "mutants").mkdir()  # mutmut's state: kept while nothing changed, so a second run resumes
    make(checkout, "mutation", *args)
    assert (work / "mutants").is_dir()
    later = time.time() + 5
    os.utime(checkout / "tests" / "test_sweep_grid.py", (later, later))
    make(checkout, "mutation", *args)
    assert not (work / "mutants").exists()  # the test file changed: mutmut starts afresh


def test_make_mutation_without_a_module_that_has_a_test_file_says_how_to_call_it(checkout: Path) -> None:
    for module in ("", "amp_lib/nope.py", "report.py"):
        done = subprocess.run(
            ["make", "mutation", f"MODULE={module}"], cwd=checkout, env={"PATH": os.environ["PATH"]},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode != 0 and not (checkout / ".venv" / "calls").exists()
        assert "usage: make mutation MODULE=amp_lib/<module>.py" in done.stderr and f"'{module}'" in done.stderr


def test_make_test_runs_every_tier_with_nbval_and_the_coverage_gate_and_test_fast_deselects_the_slow_ones() -> None:
    makefile = (ROOT / "Makefile").read_text()
    full = re.search(r"^test: setup-dev\n\t(.+)$", makefile, re.MULTILINE).group(1)
    assert (
        "--nbval-lax" in full and "--cov-fail-under=90" in full and ' -m "' not in full
    )  # no marker selection: every tier
    fast = re.search(r"^test-fast: setup-dev\n\t(.+)$", makefile, re.MULTILINE).group(1)
    assert '-m "not slow and not notebook and not gpu"' in fast and "nbval" not in fast


def test_the_files_the_runs_start_with_exist() -> None:
    # tests/conftest.py hands out the longest files first, by name: a renamed file would silently drop out.
    # Read, not imported: `conftest` may name the repo root's conftest.py in this process.
    module = ast.parse((ROOT / "tests" / "conftest.py").read_text(encoding="utf-8"))
    (order,) = (
        ast.literal_eval(node.value)
        for node in module.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name) and target.id == "LONGEST_FILES_FIRST"
    )
    stems = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    assert len(set(order)) == len(order) and set(order) <= stems, set(order) - stems


def test_the_tiers_are_declared_markers() -> None:
    pytest_ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--strict-markers" in pytest_ini["addopts"]
    assert {m.split(":")[0] for m in pytest_ini["markers"]} == {"slow", "notebook", "gpu"}


def test_no_test_file_is_named_after_a_tool() -> None:
    names = [p.name for p in (ROOT / "tests").glob("test_*.py")]
    assert names and not [n for n in names if re.search(r"mutant|mutmut|contract|nbval|coverage", n)]


def test_no_file_keeps_a_ledger_of_surviving_mutants() -> None:
    # a surviving mutant is a missing test or dead code: fixed, never recorded (docs/testing.md)
    files = [p for top in ("amp_lib", "docs", "scripts", "tests", "notebooks", ".ci") for p in (ROOT / top).rglob("*")]
    files += list(ROOT.glob("*"))
    found = [p.relative_to(ROOT) for p in files if re.search(r"surviv|ledger|mutation.?score", p.name, re.IGNORECASE)]
    assert files and not found


def _amp_lib_imports() -> dict[str, set[str]]:
    """module -> the amp_lib modules it imports anywhere (top level, TYPE_CHECKING or inside functions)."""
    import ast

    modules = {
        p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__"): p
        for p in (ROOT / "amp_lib").rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("amp_lib"):
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("amp_lib")}
        graph[name] = {m for m in found if m in modules and m != name and m != "amp_lib"}
    return graph


def test_the_import_graph_has_no_cycle() -> None:
    graph = _amp_lib_imports()
    assert "amp_lib.train" in graph and "amp_lib.config" in graph["amp_lib.train"]
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path[path.index(module) :], module))}"
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())


def test_data_flows_one_way_the_core_never_imports_the_layers_above_it() -> None:
    graph = _amp_lib_imports()
    above = {"amp_lib.notebook", "amp_lib.live", "amp_lib.explore", "amp_lib.tracking", "amp_lib.lightning_callback"}
    above |= {"amp_lib.plots", "amp_lib.bench"}
    above |= {m for m in graph if m.startswith("amp_lib.sweep")}
    for core in (
        "config",
        "precision",
        "scaler",
        "measure",
        "processes",
        "results",
        "data",
        "models",
        "train",
        "distributed",
        "report",
    ):
        assert not graph[f"amp_lib.{core}"] & above, core


# --- the shape of the code: one job per module, typed records at the seams ---


def test_no_module_of_the_library_outgrows_one_job() -> None:
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in (ROOT / "amp_lib").rglob("*.py")}
    assert len(sizes) > 20
    assert {path: n for path, n in sizes.items() if n > 600} == {}


def test_results_are_read_through_their_typed_records_not_raw_dicts() -> None:
    """A run's config and plan are parsed once, in results.py; everything else reads typed fields."""
    raw = re.compile(r"\.(config|plan)\.get\(|\.(config|plan)\[\"")
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in (ROOT / "amp_lib").rglob("*.py")
        if p.name != "results.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if raw.search(line)
    ]
    assert offenders == []


def test_the_architecture_table_lists_every_module_with_the_modules_it_imports() -> None:
    """docs/architecture.md is read to find one's way: a module missing from it, or an import it does not show,
    misleads the reader."""
    rows = re.findall(r"^\| `([\w/]+)\.py` \| .+ \| ([^|]+) \|$", (ROOT / "docs" / "architecture.md").read_text(), re.MULTILINE)
    documented = {path.replace("/", "."): {m.strip() for m in imports.split(",")} - {"—"} for path, imports in rows}
    graph = {
        name.removeprefix("amp_lib."): {m.removeprefix("amp_lib.") for m in imports}
        for name, imports in _amp_lib_imports().items()
        if name not in ("amp_lib", "amp_lib.sweep", "amp_lib.sweep.__main__")
    }
    assert documented == graph
