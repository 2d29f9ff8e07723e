"""The layout holds: imports run one way (the contracts in .importlinter: layers, no circles), no module imports
another module's private names, modules stay small, and the README's code map is the tree. Each guard is also shown
refusing a deliberate violation in a scratch copy of the package."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

PACKAGE = REPO / "src" / "deepred"
CONTRACTS = REPO / ".importlinter"
MAX_LINES = 400


def lint_imports(src: Path, contracts: Path = CONTRACTS) -> subprocess.CompletedProcess:
    """import-linter's check of the package under `src` (a scratch copy, or the real one)."""
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([str(lint), str(contracts), "--no-cache", "--no-logo"], cwd=src, env=env,
                          capture_output=True, text=True, timeout=300)


def scratch_copy(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(PACKAGE, src / "deepred", ignore=shutil.ignore_patterns("__pycache__", "resources"))
    return src


def add_line(module: Path, line: str) -> None:
    text = module.read_text()
    marker = "from __future__ import annotations\n"
    module.write_text(text.replace(marker, marker + line + "\n", 1) if marker in text else line + "\n" + text)


# ---------------------------------------------------------------------------------------------------------------
# imports run one way


def test_the_import_contracts_hold():
    result = lint_imports(PACKAGE.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, line, broken", [
    # a circle: files.py imports records.py, which imports files.py back (and from above itself)
    ("files.py", "from .records import CARD", None),
    # a lower layer reaching up: shared pieces must not know a stage
    ("persona.py", "from .train import TrainResult", "one-way layers"),
    # one stage importing another: merging must not import the trainer
    ("merge.py", "from .train.model import load_model", "one-way layers"),
    # inside a package: the batch plan may not import the flow that uses it
    ("train/plan.py", "from .stage import train", "train package layers"),
])
def test_the_import_contracts_refuse_a_violation(tmp_path, module, line, broken):
    src = scratch_copy(tmp_path)
    if broken is None:  # make the circle: records imports files back
        add_line(src / "deepred" / "records.py", "from .files import Log")
        broken = "no import circles"
    add_line(src / "deepred" / module, line)
    result = lint_imports(src)
    assert result.returncode != 0, result.stdout
    assert re.search(rf"{re.escape(broken)}.* BROKEN", result.stdout), result.stdout


def test_merge_evaluate_and_validate_import_no_training_module():
    import grimp

    graph = grimp.build_graph("deepred")
    for stage in ("deepred.merge", "deepred.evaluate", "deepred.validate", "deepred.export", "deepred.serve"):
        assert not graph.chain_exists(importer=stage, imported="deepred.train", as_packages=True), stage


# ---------------------------------------------------------------------------------------------------------------
# private names stay private


def private_imports(root: Path) -> list[str]:
    """`from X import _name` where X is another module of the package (relative or absolute): what a module keeps
    to itself must not be used elsewhere; a shared helper becomes public where it belongs."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            ours = node.level > 0 or (node.module or "").split(".")[0] == "deepred"
            for alias in node.names if ours else ():
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {alias.name} from {node.module or '.'}")
    return found


def test_no_module_imports_another_modules_private_names():
    assert private_imports(PACKAGE) == []


def test_no_test_imports_a_private_name():
    assert private_imports(REPO / "tests") == []


def test_the_private_name_check_refuses_one(tmp_path):
    src = scratch_copy(tmp_path)
    add_line(src / "deepred" / "merge.py", "from .publish.cards import _hidden")
    [found] = private_imports(src / "deepred")
    assert found.startswith("merge.py:") and found.endswith(": _hidden from publish.cards")


# ---------------------------------------------------------------------------------------------------------------
# size and the map


def test_modules_stay_small_and_training_reads_top_to_bottom():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
    assert sizes["train/stage.py"] < 150


def code_map() -> set[str]:
    """The module paths the README's code map names (its ```text block under `## Layout`): `name.py` at the top
    level, `package/` followed by its indented modules."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    paths, package = set(), None
    for line in block.splitlines()[2:]:  # after `src/deepred/`
        indent = len(line) - len(line.lstrip())
        name = line.split()[0] if line.strip() else ""
        if name.endswith("/"):
            package = name
        elif name.endswith(".py"):
            paths.add(name if indent <= 2 else f"{package}{name}")
    return paths


def test_the_readme_code_map_is_the_tree():
    tree = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert code_map() == tree
