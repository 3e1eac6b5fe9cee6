"""Regenerate the reference tables of the docs from the code: `python docs/generate_tables.py`.

* docs/configuration.md, the settings table: every field of `app.core.settings.Settings` (its `SSD_*`
  variable, default and description);
* docs/operations.md, the metrics table: every metric `app.core.metrics.Metrics` registers (name as
  exposed, type, labels, help).

Each table sits between `<!-- generated: NAME -->` and `<!-- end generated: NAME -->`; the rest of the
page is written by hand. `--check` changes nothing and exits 1 naming the stale pages
(tests/test_docs.py runs it).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry
from pydantic.fields import FieldInfo

from app.core.metrics import Metrics
from app.core.settings import Settings

DOCS = Path(__file__).resolve().parent
COMMAND = "python docs/generate_tables.py"


def _default(field: FieldInfo) -> str:
    """A field's default as a reader sets it: unset, a number with its power-of-two form, a plain value."""
    value = field.get_default(call_default_factory=True)
    if value is None or value == []:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int) and value >= 2**20 and value & (value - 1) == 0:
        return f"`{value}` (2^{value.bit_length() - 1})"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def settings_table() -> str:
    """Markdown table of every setting: variable, default, meaning."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| `SSD_{name.upper()}` | {_default(field)} | {meaning} |")
    return "\n".join(rows)


def metrics_table() -> str:
    """Markdown table of every metric the service registers: name as exposed, type, labels, help."""
    metrics = Metrics(CollectorRegistry(), ["class_0"])
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for family in metrics.registry.collect():
        exposed = family.name + {"counter": "_total", "info": "_info"}.get(family.type, "")
        collector = metrics.registry._names_to_collectors[exposed]
        labels = ", ".join(f"`{label}`" for label in collector._labelnames)  # as tests/app/core/test_metrics.py
        rows.append(f"| `{exposed}` | {family.type} | {labels} | {family.documentation} |")
    return "\n".join(rows)


TABLES = {"settings": ("configuration.md", settings_table), "metrics": ("operations.md", metrics_table)}


def _block(name: str, table: str) -> str:
    return f"<!-- generated: {name} ({COMMAND}) -->\n{table}\n<!-- end generated: {name} -->"


def render(page_text: str, name: str, table: str) -> str:
    """`page_text` with the block `name` replaced by `table`; ValueError when the page has no such block."""
    pattern = re.compile(rf"<!-- generated: {name}\b.*?<!-- end generated: {name} -->", re.DOTALL)
    if not pattern.search(page_text):
        raise ValueError(f"no generated block {name!r}")
    return pattern.sub(lambda _: _block(name, table), page_text)


def stale_pages() -> dict[Path, str]:
    """Pages whose generated tables differ from the code, with their regenerated text."""
    changed = {}
    for name, (page, make_table) in TABLES.items():
        path = DOCS / page
        text = changed.get(path, path.read_text())
        updated = render(text, name, make_table())
        if updated != path.read_text():
            changed[path] = updated
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a table is stale")
    args = parser.parse_args(argv)
    changed = stale_pages()
    if args.check:
        for path in changed:
            print(f"{path.relative_to(DOCS.parent)} is stale: run {COMMAND}", file=sys.stderr)
        return 1 if changed else 0
    for path, text in changed.items():
        path.write_text(text)
        print(f"regenerated {path.relative_to(DOCS.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
