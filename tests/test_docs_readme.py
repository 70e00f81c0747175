"""The README stays short and leads with what a newcomer needs: install, the demo, their own
photos, the results and the way to the docs, within its first two screens."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIRST_SCREENS = 70  # source lines; the HTML comments of the test markers render as nothing
ESSENTIALS = {
    "install": "## Install",
    "the demo": "make demo",
    "your photos": "deepcluster train --data ~/photos",
    "the results": "## Results",
    "the docs": "(docs/usage.md)",
}


def test_readme_is_at_most_200_lines() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_leads_with_install_demo_photos_results_and_docs() -> None:
    head = "\n".join((ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:FIRST_SCREENS])
    missing = [what for what, text in ESSENTIALS.items() if text not in head]
    assert not missing, f"the first {FIRST_SCREENS} lines of README.md lack: {', '.join(missing)}"
