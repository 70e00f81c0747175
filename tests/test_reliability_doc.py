"""docs/reliability.md cites a test for every fault; each cited test must exist."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_test_cited_in_reliability_md_exists():
    text = (ROOT / "docs" / "reliability.md").read_text()
    cited, current = set(), None
    for match in re.finditer(r"`(tests/[\w/]+\.py)?::(\w+)`", text):
        current = match.group(1) or current
        assert current is not None, match.group(0)
        cited.add((current, match.group(2)))
    assert len(cited) >= 30
    for path, name in sorted(cited):
        tree = ast.parse((ROOT / path).read_text())
        names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert name in names, f"docs/reliability.md cites {path}::{name}, which does not exist"
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| **")]
    table = rows[1:]  # the header row has no test
    assert all("test" in row.split("|")[-2] for row in table if not row.startswith("|---"))
