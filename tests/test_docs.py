"""The README and the docs stay true: every relative link resolves, every command they show composes.

Links: every ``[text](target)`` outside code in README.md, docs/*.md and experiments/**/README.md
that is not a URL must name an existing file, and a ``#anchor`` must name a heading of that file
(GitHub's heading ids). Commands: every ``fusemt``, ``fusemt-score`` and ``fusemt-compat`` command
in their code blocks is run through the entry point's own start-up path (``runners.cli.run_cli``:
``--version``, Hydra compose of each swept value, the typed config and its checks) with the job
itself replaced by a stub, so nothing loads a model, reads a dataset or touches the hub.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "experiments").glob("**/README.md")])
# Each console script (pyproject.toml [project.scripts]) and the module whose main() it runs.
ENTRY_POINTS = {"fusemt": "runners.translate", "fusemt-score": "runners.score", "fusemt-compat": "runners.compat"}

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[([^\]\n]*)\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: link text kept, lower case, punctuation dropped, spaces to hyphens."""
    text = LINK.sub(lambda m: m.group(1), heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading id of a Markdown file (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    ids = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = github_anchor(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        ids.add(base if count == 0 else f"{base}-{count}")
    return ids


def relative_links(path: Path) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    return [target for _, target in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def test_doc_files_are_found():
    names = {_rel(p) for p in DOC_FILES}
    assert {"README.md", "docs/methods.md", "experiments/wmt24pp_en_ja/README.md"} <= names


@pytest.mark.parametrize("doc", DOC_FILES, ids=_rel)
def test_relative_links_resolve(doc):
    broken = []
    for target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        linked = (doc.parent / file_part).resolve() if file_part else doc
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: {_rel(linked)} has no heading with id '{anchor}'")
    assert not broken, f"{_rel(doc)}: " + "; ".join(broken)


@dataclass
class DocCommand:
    where: str  # file:line of the command's first line
    program: str  # the console script
    args: list[str]
    after_make: list[str]  # make targets run before it in the same && chain

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join([self.program, *self.args])}"


def _shell_lines(block: str, first_line: int):
    """(line number, logical line) of a code block: continuations joined."""
    pending, start = "", first_line
    for offset, line in enumerate(block.splitlines()):
        if not pending:
            start = first_line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def doc_commands() -> list[DocCommand]:
    """Every fusemt/fusemt-score/fusemt-compat command in the docs' code blocks."""
    found = []
    for doc in DOC_FILES:
        text = doc.read_text(encoding="utf-8")
        for fence in FENCE.finditer(text):
            first_line = text.count("\n", 0, fence.start()) + 2  # the line after the opening fence
            body = fence.group(0).split("\n", 1)[1].rsplit("```", 1)[0]
            for line_no, line in _shell_lines(body, first_line):
                try:
                    tokens = shlex.split(line, comments=True)
                except ValueError:  # not shell (e.g. a JSON example)
                    continue
                makes: list[str] = []
                command: list[str] = []
                for token in [*tokens, "&&"]:
                    if token not in ("&&", "&", ";", "||", "|"):
                        command.append(token)
                        continue
                    while command and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", command[0]):  # VAR=value prefix
                        command.pop(0)
                    if command and command[0] == "make":
                        makes += command[1:]
                    elif command and command[0] in ENTRY_POINTS:
                        # "..." stands for "more overrides" in a few examples.
                        found.append(DocCommand(f"{_rel(doc)}:{line_no}", command[0],
                                                [t for t in command[1:] if t != "..."], list(makes)))
                    command = []
    return found


DOC_COMMANDS = doc_commands()


def test_doc_commands_are_found():
    programs = {c.program for c in DOC_COMMANDS}
    assert programs == set(ENTRY_POINTS), programs
    # The README's re-scoring command (it once died with an InterpolationKeyError on paths.shared_data).
    assert any(c.where.startswith("README.md") and c.program == "fusemt-score"
               and "dataset=wmt24pp_en_ja_test" in c.args for c in DOC_COMMANDS)
    assert any("-m" in c.args for c in DOC_COMMANDS)  # multirun sweeps are covered


def _without_missing_ray_launcher(cmd: DocCommand) -> list[str]:
    """``make launchers-ray && fusemt -m hydra/launcher=ray ...``: the Ray launcher is an optional
    install; without it, its overrides are left out and the rest of the command is still checked."""
    if "launchers-ray" not in cmd.after_make or importlib.util.find_spec("hydra_plugins.hydra_ray_launcher"):
        return cmd.args
    return [a for a in cmd.args if a != "hydra/launcher=ray" and not a.lstrip("+").startswith("hydra.launcher.")]


@pytest.mark.parametrize("cmd", DOC_COMMANDS, ids=str)
def test_doc_command_composes(cmd, monkeypatch, capsys):
    import runners.config

    # The Qwen members (after `make models`) are checked as specs, but their installed parts are not
    # required: a fresh clone runs `make test` without `make models`. Nothing else is stubbed: dataset
    # files (e.g. in ../shared) are only read once a job runs, so no command needs them to compose.
    monkeypatch.setattr(runners.config, "check_available", lambda chunks, name, cache: chunks.check(name))
    module = importlib.import_module(ENTRY_POINTS[cmd.program])
    jobs = []
    monkeypatch.setattr(module, "_main", lambda: jobs.append(cmd))  # the job itself: never run here
    monkeypatch.setattr(sys, "argv", [cmd.program, *_without_missing_ray_launcher(cmd)])
    try:
        module.main()
    except SystemExit as stop:
        pytest.fail(f"{cmd} exits {stop.code}: {capsys.readouterr().err.strip()}")
    assert jobs or "--version" in cmd.args, f"{cmd}: the entry point did not reach its job"
