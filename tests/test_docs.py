"""The documentation: the site builds strictly and offline, the generated tables match the code, and the
README stays a short entry page whose links resolve."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def _generator():
    spec = importlib.util.spec_from_file_location("generate_tables", REPO / "docs" / "generate_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(300)
def test_the_site_builds_strictly_with_no_outside_assets(tmp_path):
    """`mkdocs build --strict`: every nav entry, link and anchor resolves; no page loads a CDN asset."""
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=REPO,
        capture_output=True, text=True, timeout=280, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    pages = list(site.rglob("*.html"))
    assert len(pages) >= 12
    outside = re.compile(r"<(?:link|script|img)\b[^>]*(?:href|src)=\"(?:https?:)?//", re.IGNORECASE)
    for page in pages:
        assert not outside.search(page.read_text()), page


def test_the_generated_tables_match_the_code():
    generator = _generator()
    stale = generator.stale_pages()
    assert not stale, f"stale: {[str(p) for p in stale]}; run python docs/generate_tables.py"


def test_a_stale_table_is_detected_and_regenerated():
    generator = _generator()
    page = (REPO / "docs" / "configuration.md").read_text()
    row = next(line for line in page.splitlines() if line.startswith("| `SSD_MODEL`"))
    stale = page.replace(row + "\n", "")  # a setting the table lost
    assert stale != page
    assert generator.render(stale, "settings", generator.settings_table()) == page
    with pytest.raises(ValueError, match="no generated block 'metrics'"):
        generator.render(stale, "metrics", generator.metrics_table())


def test_every_setting_and_metric_is_in_its_table():
    from prometheus_client import CollectorRegistry

    from app.core.metrics import Metrics
    from app.core.settings import Settings

    configuration = (REPO / "docs" / "configuration.md").read_text()
    for name in Settings.model_fields:
        assert f"| `SSD_{name.upper()}` |" in configuration, name
    operations = (REPO / "docs" / "operations.md").read_text()
    for family in Metrics(CollectorRegistry()).registry.collect():
        assert f"| `{family.name}" in operations, family.name


def test_the_readme_is_a_short_entry_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", quick_start, re.DOTALL).group(1)
    assert len(block.splitlines()) <= 12
    assert "$PORT" in block and "8000" not in block.replace("export PORT=8000", "")  # one PORT variable
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert (REPO / target).exists(), target
