"""Print the mutation score per module from `mutmut results --all true` (run after `mutmut run`).

Killed (and timed-out) mutants count as caught. Survivors listed in the data file
docs/mutation-survivors.toml are reported apart: under [equivalent] (behaviour cannot differ, so the
adjusted score leaves them out) or under [not_reached] (only a GPU, a Jupyter kernel or a worker
process runs them, so they stay in the adjusted score's denominator); each entry is
`"<mutant name>" = "why"`. Any other survivor is named at the end, and so is a listed one that the
run caught or no longer has (the entry is out of date). Exit status is 1 when the adjusted score is
under --fail-under.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
# "segfault" is how mutmut 3.8.1 reports a worker it had to SIGKILL one CPU second after SIGXCPU
# (an endless loop that ignored the soft limit): a timeout, i.e. the mutant's tests did not pass.
CAUGHT = {"killed", "timeout", "segfault", "caught by type check"}


def results(mutmut: str) -> dict[str, str]:
    out = subprocess.run([mutmut, "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True, check=True)
    found = {}
    for line in out.stdout.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and name.startswith("amp_lib."):
            found[name] = status
    return found


def listed(data: Path, table: str) -> set[str]:
    """The mutant names of one table ([equivalent] or [not_reached]) of the survivors' data file."""
    if not data.exists():
        return set()
    return set(tomllib.loads(data.read_text(encoding="utf-8")).get(table, {}))


def stale(found: dict[str, str], listed: set[str]) -> list[str]:
    """Listed survivors that this run caught or no longer has, in the modules it ran. Mutants are numbered
    within their function, so an edit to the function renumbers them and an entry comes to name another
    mutant; such entries need rewriting from the run's survivors."""
    ran = {module_of(name) for name, status in found.items() if status != "not checked"}
    return sorted(
        name
        for name in listed
        if module_of(name) in ran and (name not in found or found[name] in CAUGHT)
    )


def module_of(name: str) -> str:
    """"amp_lib.sweep.grid.x_expand_grid__mutmut_3" -> "amp_lib.sweep.grid" (methods: "xǁClassǁname")."""
    return re.split(r"\.xǁ|\.x_", name, maxsplit=1)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutmut", default=str(Path(sys.executable).with_name("mutmut")))
    parser.add_argument("--survivors", type=Path, default=ROOT / "docs" / "mutation-survivors.toml")
    parser.add_argument("--fail-under", type=float, default=0.0, help="adjusted score (%%) below which to exit 1")
    args = parser.parse_args(argv)

    found = results(args.mutmut)
    equivalent, not_reached = listed(args.survivors, "equivalent"), listed(args.survivors, "not_reached")
    per_module: dict[str, Counter[str]] = defaultdict(Counter)
    for name, status in found.items():
        if status == "survived" and name in equivalent:
            status = "equivalent"
        elif status == "survived" and name in not_reached:
            status = "not reached"
        per_module[module_of(name)][status] += 1

    print(
        f"{'module':<28}{'killed':>8}{'survived':>10}{'equiv.':>8}{'not reached':>13}{'unchecked':>11}"
        f"{'score':>9}{'adjusted':>10}"
    )
    total: Counter[str] = Counter()
    for module in sorted(per_module):
        c = per_module[module]
        total.update(c)
        print(_row(module, c))
    print(_row("total", total))
    unlisted = sorted(n for n, s in found.items() if s == "survived" and n not in equivalent | not_reached)
    if unlisted:
        print(f"\n{len(unlisted)} surviving mutant(s) neither killed nor listed:")
        print("\n".join(f"  {n}" for n in unlisted))
    outdated = stale(found, equivalent | not_reached)
    if outdated:
        print(f"\n{len(outdated)} listed survivor(s) caught by this run or gone (entries out of date):")
        print("\n".join(f"  {n}: {found.get(n, 'no such mutant')}" for n in outdated))
    return 1 if _scores(total)[1] < args.fail_under else 0


def _scores(c: Counter[str]) -> tuple[float, float]:
    caught = sum(c[s] for s in CAUGHT)
    checked = caught + c["survived"] + c["equivalent"] + c["not reached"] + c["suspicious"]
    raw = 100.0 * caught / checked if checked else 0.0
    adjusted = 100.0 * caught / (checked - c["equivalent"]) if checked - c["equivalent"] else 0.0
    return raw, adjusted


def _row(label: str, c: Counter[str]) -> str:
    caught = sum(c[s] for s in CAUGHT)
    raw, adjusted = _scores(c)
    return (
        f"{label:<28}{caught:>8}{c['survived']:>10}{c['equivalent']:>8}{c['not reached']:>13}{c['not checked']:>11}"
        f"{raw:>8.1f}%{adjusted:>9.1f}%"
    )


if __name__ == "__main__":
    raise SystemExit(main())
