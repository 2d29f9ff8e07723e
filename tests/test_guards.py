"""The guard check: every guard in tests/guards.py, weakened by its one-line edit in a scratch copy of the repository,
must make its own tests fail. A guard whose tests still pass when it is weakened is not proven to refuse anything.
(`make guard-check` runs this file alone.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .guards import GUARDS

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "deepred"
IDS = [guard[0] for guard in GUARDS]


@pytest.mark.parametrize("name, file, original, weakened, tests", GUARDS, ids=IDS)
def test_each_guard_edit_still_matches_the_code_exactly_once(name, file, original, weakened, tests):
    text = (PACKAGE / file).read_text()
    assert text.count(original) == 1, f"{name}: {original!r} occurs {text.count(original)} times in {file}"
    assert weakened != original
    for node in tests:
        assert (REPO / node.split("::")[0]).is_file(), node


def scratch_copy(destination: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for part in ("src", "tests"):
        shutil.copytree(REPO / part, destination / part, ignore=ignore)
    shutil.copy2(REPO / "pyproject.toml", destination / "pyproject.toml")
    return destination


@pytest.mark.slow
@pytest.mark.parametrize("name, file, original, weakened, tests", GUARDS, ids=IDS)
def test_a_weakened_guard_fails_its_tests(name, file, original, weakened, tests, tmp_path):
    scratch = scratch_copy(tmp_path / "repo")
    target = scratch / "src" / "deepred" / file
    target.write_text(target.read_text().replace(original, weakened))
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                         cwd=scratch, env=env, capture_output=True, text=True, timeout=600)
    summary = run.stdout.strip().splitlines()[-1:] or run.stderr.strip().splitlines()[-1:]
    # exit 1: tests ran and some failed; 0 would mean the weakened guard passed, 2-5 that nothing meaningful ran
    assert run.returncode == 1, f"weakened guard {name!r} gave pytest exit {run.returncode}: {summary}"
    assert " failed" in run.stdout, run.stdout[-2000:]
