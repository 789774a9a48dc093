"""The curated mutants (mutation/mutants.py) still apply to the tree: each one's text occurs
exactly once in the file it names, and the tests it runs exist. A mutant whose text moved
away would be reported "stale" by the mutation run, not killed; this finds it at once."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_mutant_applies_once_and_names_real_tests():
    spec = importlib.util.spec_from_file_location("mutants", ROOT / "mutation" / "mutants.py")
    assert spec is not None and spec.loader is not None
    mutants = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("mutants", mutants)  # its dataclasses look their module up
    spec.loader.exec_module(mutants)
    problems = []
    for m in mutants.MUTANTS:
        path = ROOT / m.file
        count = path.read_text(encoding="utf-8").count(m.old) if path.exists() else 0
        if count != 1:
            problems.append(f"{m.id}: its text occurs {count} times in {m.file}")
        tests = {a.split("::")[0] for selection in m.tests for a in selection if a.startswith("tests/")}
        problems += [f"{m.id}: no {t}" for t in sorted(tests) if not (ROOT / t).exists()]
    assert not problems, "\n".join(problems)
