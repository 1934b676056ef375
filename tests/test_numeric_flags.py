"""Every int and float option of every command, found through typer's own metadata, refuses what
Python's int() and float() would take but a user did not mean ('1_0', full-width digits, 'inf',
'nan', hex) with one `error:` line and exit code 2 - so a flag added later is covered without
anyone adding it here. Accepted values still come through as numbers, inside the option's bounds."""

from __future__ import annotations

import inspect
import sys

import pytest
import typer.models
import typer.utils

from ps3edge.cli import main
import ps3edge.cli.app  # noqa: F401  (the module, not the typer app of the same name in ps3edge.cli)

APP = sys.modules["ps3edge.cli.app"].app

# 10 as users mistype it, and numbers that are not finite; each is a value Python would convert
REFUSED_BY_BOTH = ["1_0", "\uff11\uff10", "\u0661\u0660", "0x10", "1e", "", "ten", "1" * 41]
REFUSED_FOR_FLOATS = ["inf", "-inf", "nan", "NaN", "infinity", "1e999"]
REFUSED_FOR_INTS = REFUSED_FOR_FLOATS + ["1.5", "1e1", "10.0"]


def _number_kind(annotation):
    args = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
    kind = args[0] if len(args) == 1 else annotation
    return kind if kind in (int, float) else None


def numeric_options() -> list[tuple[str, str, type, typer.models.ParameterInfo]]:
    """(command, flag, int or float, the OptionInfo typer reads) for every numeric parameter."""
    found = []
    for command in APP.registered_commands:
        name = command.name or command.callback.__name__.replace("_", "-")
        metas = typer.utils.get_params_from_function(command.callback)
        for param in inspect.signature(command.callback).parameters.values():
            kind = _number_kind(metas[param.name].annotation)
            if kind is None:
                continue
            info = param.default
            flag = next((d.split("/")[0] for d in (info.param_decls or ()) if d.startswith("--")),
                        "--" + param.name.replace("_", "-"))
            found.append((name, flag, kind, info))
    return found


OPTIONS = numeric_options()


def test_the_walk_finds_the_numeric_options_of_every_command():
    commands = {c for c, *_ in OPTIONS}
    assert {"export", "extract", "run", "chat", "serve", "bench", "calibrate", "build"} <= commands
    flags = {(c, f) for c, f, *_ in OPTIONS}
    assert {("extract", "--shard-size"), ("extract", "--fps"), ("export", "--max-batch"),
            ("chat", "--temperature"), ("serve", "--http-port")} <= flags
    assert all(info.parser is not None for *_, info in OPTIONS), "a numeric option without the strict parser"


def _refusal(capsys, command: str, flag: str, value: str) -> str:
    with pytest.raises(SystemExit) as exited:
        # the bad flag first: click converts options in the order they were given, so it is
        # refused before any missing required argument is reported
        main([command, flag, value])
    _, err = capsys.readouterr()
    assert exited.value.code == 2, (command, flag, value, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("command,flag,kind", [(c, f, k) for c, f, k, _ in OPTIONS],
                         ids=[f"{c}{f}" for c, f, *_ in OPTIONS])
def test_every_numeric_option_refuses_what_int_and_float_would_coerce(capsys, command, flag, kind):
    refused = REFUSED_BY_BOTH + (REFUSED_FOR_INTS if kind is int else REFUSED_FOR_FLOATS)
    for value in refused:
        line = _refusal(capsys, command, flag, value)
        assert line.startswith(f"error: Invalid value for '{flag}'"), (value, line)


@pytest.mark.parametrize("command,flag,kind,info", OPTIONS, ids=[f"{c}{f}" for c, f, *_ in OPTIONS])
def test_every_numeric_option_takes_plain_numbers_inside_its_bounds(command, flag, kind, info):
    low = info.min if info.min is not None else 0
    good = [str(low), f" {low} ", f"+{low}"] + (["0.5", "2.", ".5", "1e-3"] if kind is float and low <= 0 else [])
    for text in good:
        value = info.parser(text)
        assert type(value) is kind and value == kind(text.strip())
    if info.default not in (None, ...):
        assert info.parser(info.default) == info.default          # the signature's own default passes
    if info.min is not None:
        with pytest.raises(Exception, match="less than the least allowed"):
            info.parser(str(info.min - 1))
    if info.max is not None:
        with pytest.raises(Exception, match="more than the most allowed"):
            info.parser(str(info.max + 1))


def test_a_bool_is_not_a_number():
    *_, info = next(o for o in OPTIONS if o[2] is int)
    with pytest.raises(Exception, match="not a whole number"):
        info.parser(True)
