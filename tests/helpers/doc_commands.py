"""Every ``python -m kdlab...`` command the manual shows (README.md and docs/**/*.md), as the reader would type
it: from fenced code blocks (one per line, ``\\`` continuations joined, shell comments dropped) and from
inline code spans. The placeholders the pages use for the reader's own paths are replaced by a small,
explicit list (:data:`PLACEHOLDERS`); nothing else is rewritten."""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

FENCE = re.compile(r"^(```|~~~)([^\n]*)\n(.*?)^\1[ \t]*$", re.DOTALL | re.MULTILINE)
NOT_SHELL = ("text",)  # fences whose lines are not commands (```text: a file layout, an output)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
START = re.compile(r"\bpython -m kdlab(?:\.[a-z_]+)?(?![\w.])")
SHELL_END = ("|", "||", "&&", ";", ">", ">>", "2>&1", "&")

#: What the pages write for the reader's own values, and what the test puts in their place. A placeholder
#: stands for a path or a value the reader chooses; each is replaced wherever it occurs in a command.
#: ``{file}`` is an existing empty file (a teacher checkpoint or weights file the reader has); ``{teachers}`` a
#: folder holding an empty ``<arch>_vanilla/ckpt_epoch_240.pth`` for every released teacher.
PLACEHOLDERS: dict[str, str] = {
    " ...": "",                                        # "python -m kdlab ..." (any overrides)
    "$(ARGS)": "",                                     # the Makefile's pass-through
    "<date>/<time>": "2026-01-01/00-00-00",            # a run or sweep directory's time stamp
    "<sweep dir>": "outputs/multirun/2026-01-01/00-00-00",
    "pipeline.teacher_checkpoint=teacher.pt": "pipeline.teacher_checkpoint={file}",
    "model.pretrained=/models/resnet34_cifar100.pth": "model.pretrained={file}",
    "teacher=released": "teacher=released paths.teachers_dir={teachers}",  # the reader's unpacked cifar_teachers
    "paths.teachers_dir=/shared/cifar_teachers": "",
    "<recipe>": "dkd_cifar100",                        # python -m kdlab.cards <recipe>
}


@dataclass(frozen=True)
class Command:
    page: str      # relative to the repository root
    line: int      # where the command starts
    text: str      # as shown (continuations joined)
    module: str    # kdlab, kdlab.compare, kdlab.study, kdlab.export, kdlab.zoo
    args: tuple[str, ...]  # after the placeholders, split as the shell splits them

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def _replace_placeholders(text: str) -> str:
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    return text


def _split(text: str) -> list[str]:
    """The shell's words of one command (comments dropped), up to a pipe, a redirection or a next command."""
    words = shlex.split(text, comments=True)
    for i, w in enumerate(words):
        if w in SHELL_END:
            return words[:i]
    return words


def _command(page: Path, line: int, text: str) -> Command:
    text = text.strip()
    words = _split(_replace_placeholders(text))
    name = str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else page.name
    return Command(name, line, text, words[2], tuple(words[3:]))


def _logical_lines(block: str) -> list[tuple[int, str]]:
    """(offset of the first line, line) with backslash continuations joined."""
    out: list[tuple[int, str]] = []
    pending, first = "", 0
    for i, raw in enumerate(block.splitlines()):
        if not pending:
            first = i
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        out.append((first, pending + raw))
        pending = ""
    if pending:
        out.append((first, pending))
    return out


def commands_of(page: Path) -> list[Command]:
    text = page.read_text(encoding="utf-8")
    found: list[Command] = []
    spans: list[tuple[int, int]] = []
    for m in FENCE.finditer(text):
        spans.append(m.span())
        if m.group(2).strip() in NOT_SHELL:
            continue
        block_line = text.count("\n", 0, m.start(3)) + 1
        for offset, line in _logical_lines(m.group(3)):
            start = START.search(line)
            if not start:
                continue
            before = line[: start.start()]
            if "#" in before:  # shown in a comment ("make study   # = python -m kdlab.study ..."): the command
                command = re.split(r"\s{2,}", line[start.start():])[0]  # ends where the aligned prose begins
            else:
                command = line[start.start():]
            found.append(_command(page, block_line + offset, command))
    for m in INLINE.finditer(text):
        if any(a <= m.start() < b for a, b in spans) or not START.match(m.group(1)):
            continue
        found.append(_command(page, text.count("\n", 0, m.start()) + 1, m.group(1)))
    return sorted(found, key=lambda c: c.line)


def all_commands() -> list[Command]:
    return [c for page in PAGES for c in commands_of(page)]
