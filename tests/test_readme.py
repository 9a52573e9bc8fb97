"""The README in step with `--help`: every command has a row in its command table, each row names the
arguments `--help` shows and only options the command has, and every example (README and --help) parses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from quantkit.cli.main import cli

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def _leaves(group: click.Group, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], click.Command]:
    out: dict[tuple[str, ...], click.Command] = {}
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out |= _leaves(cmd, prefix + (name,))
        else:
            out[prefix + (name,)] = cmd
    return out


COMMANDS = _leaves(cli)


def _resolve(words: list[str]) -> tuple[tuple[str, ...], list[str]]:
    """(command path, the words after it) for `quantkit WORDS...`."""
    path: tuple[str, ...] = ()
    node: click.Command = cli
    while isinstance(node, click.Group) and words and words[0] in node.commands:
        node = node.commands[words[0]]
        path, words = path + (words[0],), words[1:]
    assert path in COMMANDS, f"`quantkit {' '.join(path + tuple(words))}`: no such command"
    return path, words


def _usage_arguments(path: tuple[str, ...]) -> list[str]:
    """The positional arguments as `quantkit PATH --help` prints them in its Usage line."""
    cmd = COMMANDS[path]
    with click.Context(cmd, info_name="quantkit " + " ".join(path)) as ctx:
        usage = cmd.get_usage(ctx)
    return [w.strip("[].") for w in usage.split("[OPTIONS]", 1)[-1].split()]


def _options(path: tuple[str, ...]) -> set[str]:
    return {o for p in COMMANDS[path].params for o in p.opts + p.secondary_opts if o.startswith("-")} | {"--help", "-h"}


# The command table: | `quantkit measure MODEL --work W` | ... |; "calibration build / show" is two rows in one.
ROWS = [m.group(1) for m in re.finditer(r"^\| `(quantkit [^`]+)`", README, re.M)]
# Every `quantkit ...` line of the README's code blocks (after `&&` too), without its trailing comment.
EXAMPLES = [seg.strip() for block in re.findall(r"```bash\n(.*?)```", README, re.S) for line in block.splitlines()
            for seg in re.sub(r"\s+#.*$", "", line).split("&&") if seg.strip().startswith("quantkit ")]


def _row_commands() -> list[tuple[tuple[str, ...], list[str]]]:
    out = []
    for row in ROWS:
        words = row.split()[1:]
        if "/" in words:  # `calibration build / show`: a group's subcommands
            i = words.index("/")
            out += [_resolve(words[: i - 1] + [w]) for w in (words[i - 1], words[i + 1])]
        else:
            out.append(_resolve(words))
    return out


def test_every_command_has_a_row_in_the_readme_table() -> None:
    listed = {path for path, _ in _row_commands()}
    assert sorted(" ".join(p) for p in set(COMMANDS) - listed) == []


@pytest.mark.parametrize("row", ROWS)
def test_a_rows_arguments_and_options_are_the_ones_help_shows(row: str) -> None:
    words = row.split()[1:]
    if "/" in words:
        return  # names subcommands only; each is checked by the table test above
    path, rest = _resolve(words)
    options = _options(path)
    given = [w for w in rest if w.startswith("-")]
    assert [o for o in given if o not in options] == [], f"{row}: not an option of `quantkit {' '.join(path)} --help`"
    # Positional placeholders, as --help's Usage line names them (RECIPE.toml is the RECIPE argument,
    # WORK one spelling of WORK|MODEL); every required one is there.
    positional, words_left = [], iter(rest)
    for w in words_left:
        if w.startswith("-"):
            if _takes_value(path, w):
                next(words_left, None)
            continue
        positional.append(w.split(".")[0])
    usage = _usage_arguments(path)
    assert len(positional) <= len(usage) and all(w in u.split("|") for w, u in zip(positional, usage)), \
        f"{row}: `quantkit {' '.join(path)} --help` names {usage}"
    required = [p for p in COMMANDS[path].params if isinstance(p, click.Argument) and p.required]
    assert len(positional) >= len(required), f"{row}: `quantkit {' '.join(path)} --help` needs {usage}"


def _takes_value(path: tuple[str, ...], option: str) -> bool:
    for p in COMMANDS[path].params:
        if option in p.opts + p.secondary_opts:
            return not getattr(p, "is_flag", False)
    return False


# The examples each command's --help shows, held to the same rule.
HELP_EXAMPLES = sorted({line.strip() for cmd in [cli, *COMMANDS.values()] for line in (cmd.help or "").splitlines()
                        if line.strip().startswith("quantkit ")})


@pytest.mark.parametrize("example", EXAMPLES + HELP_EXAMPLES)
def test_every_example_parses_with_the_current_options(example: str) -> None:
    command = re.sub(r"\s+#.*$", "", example).split(" | ")[0]  # the quantkit part of a shell pipe
    path, rest = _resolve(shlex.split(command)[1:])
    cmd = COMMANDS[path]
    # click's own parser, without converting values (the example's paths need not exist here): an unknown
    # option raises, a surplus argument is left over, a missing required one is absent.
    with click.Context(cmd, info_name="quantkit " + " ".join(path)) as ctx:
        values, extra, _order = cmd.make_parser(ctx).parse_args(args=list(rest))
    assert extra == [], f"{example}: unexpected {extra}"
    missing = [p.name for p in cmd.params if p.required and values.get(p.name) is None]
    assert missing == [], f"{example}: `quantkit {' '.join(path)} --help` requires {missing}"
