"""docs/commands.md matches the parser both ways: every command, subcommand and long option
of `build_parser()` is documented, and every `--option` the page writes exists for the
command it is written for.

The page has one section per command, headed `## \\`steer COMMAND\\`` (`## \\`steer\\`` for
the options before the command); other sections hold examples. Anywhere on the page, an
invocation `steer COMMAND ...` in inline code or in a code block may only use that
command's options, and COMMAND must exist.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from steer.cli import build_parser

DOC = Path(__file__).parents[2] / "docs" / "commands.md"
TEXT = DOC.read_text()
PARSER = build_parser()
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# An invocation runs to the end of its code span or line, or to a comma, semicolon, `&` or
# shell comment: "fix: steer lab up, or pass --netns ''" names `--netns` for another command.
INVOCATION = re.compile(r"(?<![\w/.-])steer ([a-z][a-z0-9-]*)([^,;&#]*)")
HEADING = re.compile(r"^## `steer(?: ([a-z][a-z0-9-]*))?`$", re.MULTILINE)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {
        name: sub
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name, sub in action.choices.items()
    }


def long_options(parser: argparse.ArgumentParser) -> set[str]:
    options = {o for a in parser._actions for o in a.option_strings if o.startswith("--")}
    return options - {"--help"}


def positional_choices(parser: argparse.ArgumentParser) -> list[str]:
    return [
        str(choice)
        for action in parser._actions
        if not action.option_strings and not isinstance(action, argparse._SubParsersAction)
        for choice in action.choices or ()
    ]


COMMANDS = subcommands(PARSER)


def sections() -> dict[str, str]:
    """Command ("" for the global options) -> the text of its section."""
    found: dict[str, str] = {}
    headings = list(HEADING.finditer(TEXT))
    for heading, following in zip(headings, [*headings[1:], None], strict=True):
        end = following.start() if following else len(TEXT)
        rest = TEXT[heading.end() : end]
        found[heading.group(1) or ""] = rest.split("\n## ", 1)[0]
    return found


SECTIONS = sections()


def code_texts() -> list[str]:
    """Inline code spans and the lines of fenced code blocks."""
    fenced = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
    lines = [line for block in fenced.findall(TEXT) for line in block.splitlines()]
    inline = re.findall(r"`([^`]+)`", fenced.sub("", TEXT))
    return lines + inline


def words(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def test_every_command_has_a_section_and_no_other_command_does() -> None:
    assert set(SECTIONS) == {"", *COMMANDS}


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_section_documents_every_option_and_subcommand(command: str) -> None:
    parser = COMMANDS[command] if command else PARSER
    section = SECTIONS[command]
    missing = [o for o in sorted(long_options(parser)) if not words(section, o)]
    missing += [
        f"steer {command} {c}"
        for c in positional_choices(parser)
        if not words(section, f"steer {command} {c}")
    ]
    assert not missing, f"docs/commands.md, section steer {command}: missing {missing}"


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_section_names_only_options_of_its_command(command: str) -> None:
    parser = COMMANDS[command] if command else PARSER
    unknown = sorted(set(OPTION.findall(SECTIONS[command])) - long_options(parser))
    assert not unknown, f"docs/commands.md, section steer {command}: no such option {unknown}"


def test_invocations_use_only_their_commands_options() -> None:
    wrong = []
    for code in code_texts():
        for match in INVOCATION.finditer(code):
            command, rest = match.groups()
            if command not in COMMANDS:
                wrong.append(f"{match.group(0)!r}: no command {command}")
                continue
            wrong += [
                f"{match.group(0)!r}: steer {command} has no {option}"
                for option in OPTION.findall(rest)
                if option not in long_options(COMMANDS[command])
            ]
    assert not wrong, "docs/commands.md:\n" + "\n".join(wrong)


def test_the_checks_see_the_page() -> None:
    """Guards the guards: the page's shape still lets the tests above find things."""
    assert len(code_texts()) > len(COMMANDS)
    assert "--dry-run" in OPTION.findall(SECTIONS["agent"])
    assert long_options(COMMANDS["bench"]) >= {"--rounds", "--out"}
