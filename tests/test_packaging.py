"""The set-up contract: one dependency list in two files, and a Makefile/CI that use it."""

from __future__ import annotations

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


def test_torch_floor_matches_the_design() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch>=2.4" in deps
    assert {_name(d) for d in deps} >= {"jupyterlab", "ipykernel", "papermill", "nbval", "matplotlib", "wandb", "tqdm"}


def test_ci_runs_the_readme_test_command_with_the_cpu_wheel() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci and "make test" in readme and "make sweep" in readme
    assert "torch==2.13.0" in ci


def test_makefile_reinstalls_only_when_pyproject_changes() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^\$\(STAMP\): pyproject\.toml$", makefile, re.MULTILINE)
    for target in ("test", "sweep", "lab", "bench"):
        assert re.search(rf"^{target}: setup$", makefile, re.MULTILINE), target
