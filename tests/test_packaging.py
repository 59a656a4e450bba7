"""The set-up contract: one dependency list in two files, and a Makefile/CI that use it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


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


def test_every_subpackage_is_packaged() -> None:
    packaged = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {p.parent.relative_to(ROOT).as_posix().replace("/", ".") for p in (ROOT / "amp_lib").rglob("__init__.py")}
    assert packaged == on_disk


def test_ci_runs_the_readme_test_command_with_the_cpu_wheel() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci and "make test" in readme and "make sweep" in readme
    assert "torch==2.13.0" in ci


def test_makefile_reinstalls_only_when_pyproject_changes() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^\$\(STAMP\): pyproject\.toml$", makefile, re.MULTILINE)
    for target in ("test", "test-fast", "goldens", "sweep", "lab", "bench"):
        assert re.search(rf"^{target}: setup$", makefile, re.MULTILINE), target


def test_make_test_runs_every_tier_with_nbval_and_the_coverage_gate_and_test_fast_deselects_the_slow_ones() -> None:
    makefile = (ROOT / "Makefile").read_text()
    full = re.search(r"^test: setup\n\t(.+)$", makefile, re.MULTILINE).group(1)
    assert (
        "--nbval-lax" in full and "--cov-fail-under=90" in full and ' -m "' not in full
    )  # no marker selection: every tier
    fast = re.search(r"^test-fast: setup\n\t(.+)$", makefile, re.MULTILINE).group(1)
    assert '-m "not slow and not notebook and not gpu"' in fast and "nbval" not in fast


def test_the_files_the_runs_start_with_exist() -> None:
    # tests/conftest.py orders files by name (longest first for `make test`, cheapest first under mutmut):
    # a renamed file would silently drop out of that order.
    # Read, not imported: `conftest` may name notebooks/conftest.py in this process.
    module = ast.parse((ROOT / "tests" / "conftest.py").read_text(encoding="utf-8"))
    orders = {
        target.id: ast.literal_eval(node.value)
        for node in module.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name) and target.id in ("LONGEST_FILES_FIRST", "_MUTATION_ORDER")
    }
    stems = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    assert len(orders) == 2
    for name, order in orders.items():
        assert len(set(order)) == len(order) and set(order) <= stems, (name, set(order) - stems)


def test_the_tiers_are_declared_markers() -> None:
    pytest_ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--strict-markers" in pytest_ini["addopts"]
    assert {m.split(":")[0] for m in pytest_ini["markers"]} == {"slow", "notebook", "gpu"}


def test_no_test_file_is_named_after_a_tool() -> None:
    names = [p.name for p in (ROOT / "tests").glob("test_*.py")]
    assert names and not [n for n in names if re.search(r"mutant|mutmut|contract|nbval|coverage", n)]


def test_every_listed_surviving_mutant_names_a_mutated_module_and_says_why() -> None:
    # docs/mutation-survivors.toml is read by scripts/mutation_score.py: a broken file or a name outside
    # `only_mutate` would silently leave survivors unexplained.
    survivors = tomllib.loads((ROOT / "docs" / "mutation-survivors.toml").read_text(encoding="utf-8"))
    assert set(survivors) == {"equivalent", "not_reached"}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    mutated = {path.removesuffix(".py").replace("/", ".") for path in pyproject["tool"]["mutmut"]["only_mutate"]}
    listed = {**survivors["equivalent"], **survivors["not_reached"]}
    assert not set(survivors["equivalent"]) & set(survivors["not_reached"])
    for name, why in listed.items():
        match = re.fullmatch(r"(amp_lib(?:\.\w+)+)\.x(?:_|ǁ\w+ǁ)\w+__mutmut_\d+", name)
        assert match and match.group(1) in mutated, name
        assert len(why) > 20, name


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
