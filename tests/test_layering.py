"""The import contracts in pyproject.toml ([tool.importlinter]): kept by the tree, broken by a wrong-way import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(tree)}  # the copy, ahead of the editable install
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=environment, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for package in ("ssd_core", "app"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _add_import(module: Path, line: str) -> None:
    module.write_text(module.read_text() + f"\n{line}  # noqa: E402, F401\n")


def test_the_tree_keeps_every_contract(tree: Path):
    result = _lint_imports(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout and "KEPT" in result.stdout


@pytest.mark.parametrize(("module", "line", "contract", "arrow"), [
    ("ssd_core/ops/coder.py", "import ssd_core.training.trainer", "ssd_core: ops",
     "ssd_core.ops.coder -> ssd_core.training.trainer"),
    ("ssd_core/loss/stats.py", "import fastapi", "ssd_core knows nothing", "ssd_core.loss.stats -> fastapi"),
    ("app/serving/model_host.py", "import app.api.deps", "app: core", "app.serving.model_host -> app.api.deps"),
    ("app/online/jobs.py", "import starlette.requests", "know no HTTP framework", "app.online.jobs -> starlette"),
])
def test_a_wrong_way_import_breaks_its_contract(tree: Path, module: str, line: str, contract: str, arrow: str):
    _add_import(tree / module, line)
    result = _lint_imports(tree)
    assert result.returncode != 0
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken and arrow in broken, result.stdout
