"""README.md and docs/*.md: relative links resolve, shown ``sm3-dist`` commands parse, README stays short.

* Every relative link (``[text](path)``, ``![alt](path)``, ``[ref]: path``) outside code resolves to a file
  of the repository, and its ``#anchor``, if any, to a heading of the target (GitHub's slugs: the heading's
  text without markup, lower-cased, every character that is not a letter, digit, ``_``, ``-`` or space
  dropped, spaces made ``-``; a repeated slug gets ``-1``, ``-2``, ...).
* Every ``sm3-dist ...`` command shown in a code block (fenced or indented; ``\\`` continuations joined,
  ``#`` comments dropped) goes through its subcommand's argument parser, and only the parser: the first
  ``ArgumentParser.parse_args`` call the command makes stops the command with what it parsed, so a renamed
  or removed flag fails here without running anything. Inline code spans that start with ``sm3-dist`` are
  checked the same way unless they hold placeholder syntax (``...``, ``[``, ``|``, ``{``, ``<``).
* README.md is at most :data:`README_MAX_LINES` lines.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
README_MAX_LINES = 350
PLACEHOLDERS = ("...", "[", "|", "{", "<")

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def split_markdown(text: str) -> tuple[list[str], list[list[str]]]:
    """``(prose lines, code blocks)``: prose has code blocks blanked out; a block is its list of lines.

    Fenced blocks run from a fence to the next fence of the same kind; an indented block is a run of lines
    indented by 4+ spaces (or a tab) that follows a blank line, outside list items' continuation text.
    """
    prose: list[str] = []
    blocks: list[list[str]] = []
    lines = text.split("\n")
    i = 0
    previous_blank = True
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence:
            marker = fence.group(1)
            block = []
            i += 1
            while i < len(lines) and not lines[i].lstrip().startswith(marker):
                block.append(lines[i])
                i += 1
            blocks.append(block)
            prose.extend([""] * (len(block) + 2))
            i += 1
            previous_blank = True
            continue
        if previous_blank and (line.startswith("    ") or line.startswith("\t")) and line.strip():
            block = []
            while i < len(lines) and (lines[i].startswith("    ") or lines[i].startswith("\t") or not lines[i].strip()):
                if not lines[i].strip() and (i + 1 >= len(lines) or not lines[i + 1].startswith("    ")):
                    break
                block.append(lines[i][4:] if lines[i].startswith("    ") else lines[i].lstrip("\t"))
                i += 1
            blocks.append(block)
            prose.extend([""] * len(block))
            previous_blank = False
            continue
        prose.append(line)
        previous_blank = not line.strip()
        i += 1
    return prose, blocks


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading's text (before de-duplication)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.replace("`", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w: letters, digits and _ (Unicode)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_markdown(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def relative_links(path: Path) -> list[tuple[int, str]]:
    """``(line number, target)`` of every link outside code whose target is not a URL."""
    prose, _ = split_markdown(path.read_text(encoding="utf-8"))
    found = []
    for number, line in enumerate(prose, 1):
        bare = INLINE_CODE.sub("", line)
        targets = [m.group(1) for m in LINK.finditer(bare)]
        ref = REFERENCE.match(bare)
        if ref:
            targets.append(ref.group(1))
        for target in targets:
            if not target or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:, ...
                continue
            found.append((number, target))
    return found


def link_problems(path: Path) -> list[str]:
    problems = []
    for number, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        where = f"{_rel(path)}:{number}: {target}"
        if not resolved.exists():
            problems.append(f"{where}: no such file")
            continue
        if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{where}: no heading with anchor #{anchor} in {_rel(resolved)}")
    return problems


def shown_commands(path: Path) -> list[tuple[str, str]]:
    """``(where, command)`` of every ``sm3-dist ...`` command in a code block or a plain inline code span."""
    text = path.read_text(encoding="utf-8")
    prose, blocks = split_markdown(text)
    found = []
    for index, block in enumerate(blocks):
        joined = "\n".join(block).replace("\\\n", " ")
        for line in joined.split("\n"):
            if line.strip().startswith("sm3-dist"):
                command = shlex.join(shlex.split(line, comments=True))
                found.append((f"{_rel(path)} code block {index + 1}", command))
    for number, line in enumerate(prose, 1):
        for match in INLINE_CODE.finditer(line):
            code = match.group(2).strip()
            if code.startswith("sm3-dist ") and not any(p in code for p in PLACEHOLDERS):
                found.append((f"{_rel(path)}:{number}", code))
    return found


class Parsed(Exception):
    """Raised in place of running a command, once its parser has parsed the arguments."""

    def __init__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace):
        super().__init__(parser.prog)
        self.parser = parser
        self.namespace = namespace


def parse_only(argv: list[str], monkeypatch) -> Parsed:
    """Hand ``argv`` (without ``sm3-dist``) to the CLI; stop at its subcommand's first ``parse_args``.

    ``sm3-dist bench`` (and ``bench --distributed``) build their parsers inside ``main``, with no factory to
    call, so the CLI's own dispatch is used for every subcommand; the parser's ``prog`` shows which one parsed.
    """
    from sm3_dist import cli

    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise Parsed(self, original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    try:
        rc = cli.main(argv)
    except Parsed as parsed:
        return parsed
    except SystemExit as exc:
        raise AssertionError(f"sm3-dist {shlex.join(argv)}: the parser refused it (exit {exc.code})") from None
    # sm3-dist memory's main turns its parser's exit into a return code
    raise AssertionError(f"sm3-dist {shlex.join(argv)}: the parser refused it (returned {rc} without parsing)")


COMMANDS = [item for path in DOCS for item in shown_commands(path)]


def test_the_docs_show_commands_of_every_subcommand():
    from sm3_dist.cli import SUBCOMMANDS

    shown = {shlex.split(command)[1] for _, command in COMMANDS}
    assert shown == set(SUBCOMMANDS), f"shown: {sorted(shown)}, the CLI has: {sorted(SUBCOMMANDS)}"


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[f"{w}: {c}"[:120] for w, c in COMMANDS])
def test_shown_command_parses(where, command, monkeypatch, capsys):
    argv = shlex.split(command)[1:]
    parsed = parse_only(argv, monkeypatch)
    err = capsys.readouterr().err
    assert not err, f"{where}: {command}: {err}"
    handed_over = [flag for flag in ("--distributed", "--zero-offload") if argv[0] == "bench" and flag in argv]
    expected = " ".join([f"sm3-dist {argv[0]}", *handed_over])
    assert parsed.parser.prog == expected, f"{where}: {command}: parsed by {parsed.parser.prog!r}"


def test_a_renamed_flag_fails_to_parse(monkeypatch, capsys):
    """The check above is only worth something if a flag the parser does not know is refused."""
    with pytest.raises(AssertionError, match="the parser refused it"):
        parse_only(["quality", "--data", "stdlib", "--no-such-flag"], monkeypatch)
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_relative_links_resolve(path):
    problems = link_problems(path)
    assert not problems, "\n".join(problems)


def test_links_are_found():
    """Guard against a link pattern that silently matches nothing."""
    assert len(relative_links(ROOT / "README.md")) >= 5
    assert any("#" in target for _, target in relative_links(ROOT / "README.md"))


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        (
            "Training quality: SM3 tuned against AdamW and Adafactor",
            "training-quality-sm3-tuned-against-adamw-and-adafactor",
        ),
        ("Choosing SM3's hyperparameters", "choosing-sm3s-hyperparameters"),
        ("The training job: `sm3-dist train`", "the-training-job-sm3-dist-train"),
        ("Memory: what SM3 frees, per rank", "memory-what-sm3-frees-per-rank"),
        ("ZeRO-1/2 and [FSDP1](x.md) snake_case", "zero-12-and-fsdp1-snake_case"),
    ],
)
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines, at most {README_MAX_LINES}"
