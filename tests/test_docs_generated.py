"""The pages made from the code (docs/settings.md, the recipe table of docs/recipes.md) are
what ``python -m deepcluster.docgen`` writes today: a setting or recipe changed without
regenerating them fails here, with the command that fixes it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from deepcluster import docgen
from deepcluster.config import Config

ROOT = Path(__file__).resolve().parents[1]


def test_generated_pages_are_current() -> None:
    old = [str(path.relative_to(ROOT)) for path in docgen.stale(ROOT)]
    assert not old, (f"{', '.join(old)} differ from the code; regenerate with `{docgen.COMMAND}` "
                     "(run in the repository root) and commit the result")


def test_settings_page_lists_every_setting_with_its_help() -> None:
    page = docgen.settings_page()
    for item in dataclasses.fields(Config):
        row = next((line for line in page.splitlines() if line.startswith(f"| `{item.name}`")), None)
        assert row is not None, f"{item.name} missing from the settings page"
        assert docgen.cell(item.metadata["help"]) in row
    assert [line[3:] for line in page.splitlines() if line.startswith("## ")] == list(docgen.sections())


def test_recipe_table_names_every_recipe_file() -> None:
    files = sorted(path.stem for path in (ROOT / "src/deepcluster/recipes").glob("*.yaml"))
    table = docgen.recipes_table()
    assert sorted(docgen.recipe_names()) == files
    for name in files:
        assert f"| `{name}` |" in table


def test_recipes_page_without_its_markers_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="recipes:start"):
        docgen.with_recipes_table("# Recipes\n\nno table here\n")
    page = "intro\n" + docgen.RECIPES_START + "\nold table\n" + docgen.RECIPES_END + "\n## `paper`\n"
    new = docgen.with_recipes_table(page)
    assert new.startswith("intro\n") and new.endswith(docgen.RECIPES_END + "\n## `paper`\n")
    assert "old table" not in new and "[`paper`](#paper)" in new and "| `small` |" in new


def test_check_mode_reports_a_stale_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/recipes.md").write_text(docgen.RECIPES_START + "\n" + docgen.RECIPES_END + "\n")
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 1
    assert f"regenerate with: {docgen.COMMAND}" in capsys.readouterr().err
    assert docgen.main(["--root", str(tmp_path)]) == 0
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 0
