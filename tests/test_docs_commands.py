"""The commands the README and docs/usage.md show work as shown.

Every fenced code block of those pages follows a marker line, an HTML comment a code host
does not render:

- ``<!-- test: run -->``, optionally with toy sizes (``<!-- test: run --epochs 1; eval
  --probe-epochs 2 -->``): the block runs in a temporary folder, line by line for ``bash``
  blocks and as one script for ``python`` blocks. Each ``;``-separated group of the marker
  names a command (none: ``train``); its flags replace those a ``deepcluster COMMAND`` line
  gives, or are added to it (not to ``train --resume``, which keeps the run's settings);
  nothing else of the command changes.
- ``<!-- test: file NAME -->``: the block's text is written to ``NAME`` in that folder before
  any block runs (a ``--config`` file the commands read).
- ``<!-- test: illustrative (why) -->``: shown, not run (it installs packages, needs big data
  or a GPU, takes a placeholder such as ``RUN``, or repeats a command run elsewhere).

The folder holds what the commands name, made of small generated images: ``~/photos`` (the
command's ``HOME`` is a folder of the temporary one), ``my_photos``, ``cifar10/train`` and
``cifar10/test`` (three classes), ``cat.jpg`` and ``dog.png``. ``deepcluster`` is this
interpreter's ``python -m deepcluster``. Running the blocks is ``slow``; checking that every
block has its marker, and that every ``--flag`` the pages name exists, is not.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_pattern

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/usage.md")
MARKER = re.compile(r"^<!--\s*test:\s*(run|file|illustrative)\b\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^```(\S*)\s*$")
COMMAND_TIMEOUT_S = 600  # each command takes seconds; a machine shared with other work can be far slower


@dataclass
class Block:
    page: str
    line: int  # of the opening fence, from 1
    language: str
    code: str
    kind: str | None  # run, file, illustrative; None: no marker
    argument: str


def blocks(page: str) -> list[Block]:
    """The fenced code blocks of ``page`` (relative to the repository), each with its marker."""
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    found, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        before = [line for line in lines[:index] if line.strip()][-1:]
        marker = MARKER.match(before[0]) if before else None
        found.append(Block(page, index + 1, opening.group(1), "\n".join(lines[index + 1:end]) + "\n",
                           marker.group(1) if marker else None, marker.group(2) if marker else ""))
        index = end + 1
    return found


def toy_settings(argument: str) -> dict[str, list[str]]:
    """A run marker's settings by command: ``--epochs 1; eval --probe-epochs 2`` gives train
    ``--epochs 1`` and eval ``--probe-epochs 2`` (a group without a command is train's)."""
    settings: dict[str, list[str]] = {}
    for group in filter(None, (part.split() for part in argument.split(";"))):
        command = "train" if group[0].startswith("--") else group.pop(0)
        settings.setdefault(command, []).extend(group)
    return settings


def toy_command(line: str, argument: str, home: Path) -> list[str] | None:
    """``line`` as the tokens to run, the run marker's settings (``argument``) applied; None
    for a line that is only a comment."""
    tokens = shlex.split(line, comments=True)
    if not tokens:
        return None
    tokens = [str(home) + token[1:] if token.startswith("~/") else token for token in tokens]
    if tokens[0] != "deepcluster" or len(tokens) < 2 or (tokens[1] == "train" and "--resume" in tokens):
        return tokens
    given = toy_settings(argument).get(tokens[1], [])
    for flag, value in zip(given[::2], given[1::2]):
        if flag in tokens:
            tokens[tokens.index(flag) + 1] = value
        else:
            tokens += [flag, value]
    return tokens


def test_every_code_block_is_marked_run_file_or_illustrative() -> None:
    for page in PAGES:
        for block in blocks(page):
            where = f"{page}:{block.line}"
            assert block.kind, f"{where}: a code block needs a marker line before it (<!-- test: run -->, " \
                               "<!-- test: file NAME -->, or <!-- test: illustrative (why) -->)"
            if block.kind == "run":
                assert block.language in ("bash", "python"), f"{where}: runnable blocks are bash or python"
                assert block.language == "python" or "..." not in block.code, \
                    f"{where}: a runnable command holds no '...'; mark the block illustrative"
            if block.kind == "illustrative":
                assert block.argument.startswith("("), f"{where}: say why the block is illustrative, in brackets"


def test_no_command_is_shown_outside_a_marked_block() -> None:
    """An indented code block would escape the markers: the pages show commands only fenced."""
    command = re.compile(r"^ {4,}(?:deepcluster|pip|make|python|torchrun|\.venv/)\b")
    for page in PAGES:
        text = (ROOT / page).read_text(encoding="utf-8")
        outside = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
        shown = [line.strip() for line in outside.splitlines() if command.match(line)]
        assert not shown, f"{page}: commands outside a fenced block: {shown}"


def test_toy_settings_apply_to_their_command_only(tmp_path: Path) -> None:
    settings = "--epochs 1 --n_clusters 4; report --ascent-steps 5"
    assert toy_command("deepcluster train --data ~/x --n_clusters 100   # k", settings, tmp_path) == [
        "deepcluster", "train", "--data", f"{tmp_path}/x", "--n_clusters", "4", "--epochs", "1"]
    assert toy_command("deepcluster train --out r --resume", settings, tmp_path) == [
        "deepcluster", "train", "--out", "r", "--resume"]
    assert toy_command("deepcluster report r --epoch 3", settings, tmp_path) == [
        "deepcluster", "report", "r", "--epoch", "3", "--ascent-steps", "5"]
    assert toy_command("deepcluster assign r --data d", settings, tmp_path) == [
        "deepcluster", "assign", "r", "--data", "d"]
    assert toy_command("# only a comment", settings, tmp_path) is None


def save_images(folder: Path, count: int, kinds: range, seed: int, size: int = 40) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.fromarray(make_pattern(kinds[i % len(kinds)], rng, size))
        image.save(folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}")


def make_folder(work: Path) -> dict[str, str]:
    """The images the commands name, under ``work``; returns the commands' environment."""
    home = work / "home"
    save_images(home / "photos", 16, range(3), seed=1)
    save_images(work / "my_photos", 6, range(3), seed=2)
    for kind, name in enumerate(("stripes", "rings", "checkers")):
        save_images(work / "cifar10/train" / name, 10, range(kind, kind + 1), seed=3 + kind, size=32)
        save_images(work / "cifar10/test" / name, 4, range(kind, kind + 1), seed=6 + kind, size=32)
    rng = np.random.default_rng(9)
    Image.fromarray(make_pattern(0, rng, 48)).save(work / "cat.jpg")
    Image.fromarray(make_pattern(1, rng, 48)).save(work / "dog.png")
    shim = work / "bin" / "deepcluster"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m deepcluster "$@"\n')
    shim.chmod(0o755)
    return dict(os.environ, HOME=str(home), PATH=f"{shim.parent}{os.pathsep}{os.environ.get('PATH', '')}",
                DEEPCLUSTER_PROGRESS="0")


def run_page(page: str, work: Path) -> None:
    env = make_folder(work)
    home = Path(env["HOME"])
    page_blocks = blocks(page)
    for block in page_blocks:
        if block.kind == "file":
            (work / block.argument).write_text(block.code, encoding="utf-8")
    for block in page_blocks:
        if block.kind != "run":
            continue
        if block.language == "python":
            commands = [[sys.executable, "-c", block.code]]
        else:
            commands = [tokens for line in block.code.splitlines()
                        if (tokens := toy_command(line, block.argument, home)) is not None]
        for tokens in commands:
            done = subprocess.run(tokens, cwd=work, env=env, capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT_S)
            shown = shlex.join(tokens) if block.language != "python" else f"the python block at line {block.line}"
            assert done.returncode == 0, (f"{page}:{block.line}: `{shown}` exited {done.returncode}:\n"
                                          f"{done.stderr[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_runnable_blocks_run_at_toy_size(page: str, tmp_path: Path) -> None:
    run_page(page, tmp_path)


# --- every --flag the pages name exists ---------------------------------------------------

FLAG_PAGES = ("README.md", "docs/usage.md", "docs/recipes.md", "docs/method.md", "docs/api.md",
              "docs/distributed.md")
COMMANDS = ("train", "recipes", "eval", "report", "assign", "features", "export")
# Flags of other programs the pages mention, with the program.
OTHER_PROGRAMS = {
    "--index-url": "pip", "--logdir": "tensorboard", "--set": "the bench scripts", "--list": "bench/mutants.py",
    "--record": "tests/test_v1_fixture.py", "--tiny": "bench/gpu_check.py", "--key": "a placeholder",
    "--checkpoint": "the tools' older spelling of RUN, hidden from --help",
    **dict.fromkeys(("--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port",
                     "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id", "--standalone"), "torchrun"),
    **dict.fromkeys(("--job-name", "--time", "--nodes", "--ntasks-per-node", "--gres", "--gpus-per-node",
                     "--cpus-per-task"), "SLURM's sbatch"),
}
FLAG = re.compile(r"(?<![\w-])--([a-zA-Z][\w-]*)")


def command_flags() -> dict[str, set[str]]:
    """Each command's flags, read from its ``--help`` (train's also lists every setting)."""
    from deepcluster.cli import main

    flags = {}
    for command in ("", *COMMANDS):  # "": deepcluster itself (--version)
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main([command, "--help"] if command else ["--help"])
        flags[command] = {f"--{name}" for name in FLAG.findall(out.getvalue())}
        assert f"usage: deepcluster {command}".strip() in out.getvalue(), f"deepcluster {command} --help printed nothing"
    return flags


@pytest.fixture(scope="module")
def known_flags() -> dict[str, set[str]]:
    return command_flags()


def misplaced_flags(text: str, known: dict[str, set[str]]) -> tuple[int, list[str]]:
    """How many flags follow ``deepcluster COMMAND`` on a line of ``text``, and those that
    ``COMMAND`` lacks (as "line N: deepcluster COMMAND has no --FLAG")."""
    checked, wrong = 0, []
    for number, line in enumerate(text.splitlines(), 1):
        for match in re.finditer(r"deepcluster (\w+)((?: +(?!#)[^\s`#]+)*)", line):
            command, rest = match.group(1), match.group(2)
            for flag in FLAG.findall(rest) if command in known else ():
                checked += 1
                if f"--{flag}" not in known[command]:
                    wrong.append(f"line {number}: deepcluster {command} has no --{flag}")
    return checked, wrong


def test_every_flag_on_a_command_line_belongs_to_its_command(known_flags: dict[str, set[str]]) -> None:
    total, wrong = 0, []
    for page in FLAG_PAGES:
        checked, found = misplaced_flags((ROOT / page).read_text(encoding="utf-8"), known_flags)
        total += checked
        wrong += [f"{page}: {problem}" for problem in found]
    assert not wrong, "\n".join(wrong)
    assert total >= 40, total
    assert misplaced_flags("deepcluster report runs/x --into y   # --into is assign's", known_flags) == (
        1, ["line 1: deepcluster report has no --into"])


def test_every_flag_named_in_the_pages_exists(known_flags: dict[str, set[str]]) -> None:
    every = set().union(*known_flags.values())
    unknown = []
    for page in FLAG_PAGES:
        for number, line in enumerate((ROOT / page).read_text(encoding="utf-8").splitlines(), 1):
            if "bench/" in line:  # a benchmark script's own flags, not deepcluster's
                continue
            for flag in FLAG.findall(line):
                if f"--{flag}" not in every and f"--{flag}" not in OTHER_PROGRAMS:
                    unknown.append(f"{page}:{number}: --{flag}")
    assert not unknown, "flags no command has:\n" + "\n".join(unknown)
