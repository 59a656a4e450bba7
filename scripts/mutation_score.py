"""Print the mutation score per module from `mutmut results --all true` (run after `mutmut run`).

Killed (and timed-out) mutants count as caught. Mutants listed in docs/testing.md as equivalent
(a line starting "- `amp_lib....__mutmut_N`") are reported apart: behaviour cannot differ, so the
adjusted score leaves them out. Exit status is 1 when the adjusted score is under --fail-under.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAUGHT = {"killed", "timeout", "caught by type check"}


def results(mutmut: str) -> dict[str, str]:
    out = subprocess.run([mutmut, "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True, check=True)
    found = {}
    for line in out.stdout.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and name.startswith("amp_lib."):
            found[name] = status
    return found


def equivalents(doc: Path) -> set[str]:
    if not doc.exists():
        return set()
    return set(re.findall(r"^- `(amp_lib\.[^`]+__mutmut_\d+)`", doc.read_text(), re.MULTILINE))


def module_of(name: str) -> str:
    return ".".join(name.split(".")[:2])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutmut", default=str(Path(sys.executable).with_name("mutmut")))
    parser.add_argument("--equivalents", type=Path, default=ROOT / "docs" / "testing.md")
    parser.add_argument("--fail-under", type=float, default=0.0, help="adjusted score (%%) below which to exit 1")
    args = parser.parse_args(argv)

    found = results(args.mutmut)
    equivalent = equivalents(args.equivalents)
    per_module: dict[str, Counter[str]] = defaultdict(Counter)
    for name, status in found.items():
        key = "equivalent" if status == "survived" and name in equivalent else status
        per_module[module_of(name)][key] += 1

    print(f"{'module':<22}{'killed':>8}{'survived':>10}{'equiv.':>8}{'unchecked':>11}{'score':>9}{'adjusted':>10}")
    total: Counter[str] = Counter()
    for module in sorted(per_module):
        c = per_module[module]
        total.update(c)
        print(_row(module, c))
    print(_row("total", total))
    unlisted = sorted(n for n, s in found.items() if s == "survived" and n not in equivalent)
    if unlisted:
        print(f"\n{len(unlisted)} surviving mutant(s) neither killed nor listed as equivalent:")
        print("\n".join(f"  {n}" for n in unlisted))
    return 1 if _scores(total)[1] < args.fail_under else 0


def _scores(c: Counter[str]) -> tuple[float, float]:
    caught = sum(c[s] for s in CAUGHT)
    checked = caught + c["survived"] + c["equivalent"] + c["suspicious"] + c["segfault"]
    raw = 100.0 * caught / checked if checked else 0.0
    adjusted = 100.0 * caught / (checked - c["equivalent"]) if checked - c["equivalent"] else 0.0
    return raw, adjusted


def _row(label: str, c: Counter[str]) -> str:
    caught = sum(c[s] for s in CAUGHT)
    raw, adjusted = _scores(c)
    return (
        f"{label:<22}{caught:>8}{c['survived']:>10}{c['equivalent']:>8}{c['not checked']:>11}"
        f"{raw:>8.1f}%{adjusted:>9.1f}%"
    )


if __name__ == "__main__":
    raise SystemExit(main())
