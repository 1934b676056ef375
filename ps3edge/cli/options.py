"""Options shared by several commands: the five look-close flags (declared once, added to a command
by `look_close_options`), the prompt embedding, the returned layer and a checkpoint's --revision;
and the parsing of option values typer cannot check by itself (layer lists, step sweeps, the prompt
embedding file, a checkpoint named by Hugging Face hub id)."""

from __future__ import annotations

import functools
import inspect
import math
import re
import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from pydantic_core import PydanticCustomError
import typer.models
import typer.utils

from .. import defaults
from ..errors import Ps3EdgeError
from ..paths import expect_file

SEED_MAX = defaults.SEED_MAX

PromptEmbedding = typer.Option(None, "--prompt-embedding", help="A .npy of C floats: select top-down for this prompt.")
Layer = typer.Option(defaults.DEFAULT_RUN_LAYER, "--layer", help="Which block's features to return (VILA-HD uses -2).")
Revision = typer.Option(None, "--revision", help="With a Hugging Face hub id: the branch, tag or commit to use (the same as owner/name@REVISION). Default: the repo's main branch.")
ExifTranspose = typer.Option(False, "--exif-transpose", help="Apply the EXIF orientation (cameras that write rotated JPEGs); the official processor ignores it, so parity needs it off.")

MODE_HELP = "after_prompt (top-down with --prompt-embedding) or after_image (bottom-up). Env: LOOK_CLOSE_MODE."


@dataclass(frozen=True)
class LookCloseFlags:
    """The look-close flags as given on the command line (None: not given, so the VILA-HD
    environment variable or the default decides)."""
    num_look_close: Optional[str] = None
    num_token_look_close: Optional[str] = None
    select_num_each_scale: Optional[str] = None
    look_close_mode: Optional[str] = None
    smooth_selection_prob: Optional[bool] = None

    def settings(self):
        """The runtime's LookCloseSettings: these flags over the environment over the defaults."""
        from ..runtime.planning import settings_from_env
        for flag, value in (("--num-look-close", self.num_look_close),
                            ("--num-token-look-close", self.num_token_look_close),
                            ("--select-num-each-scale", self.select_num_each_scale),
                            ("--look-close-mode", self.look_close_mode)):
            if value is not None and not value.strip():    # an empty environment variable means unset; a flag must say
                raise Ps3EdgeError(f"{flag} is empty; leave it out to use the environment or the default")
        return settings_from_env(num_look_close=self.num_look_close, num_token_look_close=self.num_token_look_close,
                                 select_num_each_scale=self.select_num_each_scale, mode=self.look_close_mode,
                                 smooth_selection_prob=self.smooth_selection_prob)

    def with_steps(self, num_look_close: str) -> "LookCloseFlags":
        """The same flags with a step count in place of any steps or token count."""
        return replace(self, num_look_close=num_look_close, num_token_look_close=None)


# parameter, type, flag, help; the mode's help is the command's own (chat defaults to top-down)
_LOOK_CLOSE_FLAGS = (
    ("num_look_close", str, "--num-look-close", "Look-close steps (int or 'all'). Env: NUM_LOOK_CLOSE; default 6."),
    ("num_token_look_close", str, "--num-token-look-close", "High-res patches in total; overrides steps. Env: NUM_TOKEN_LOOK_CLOSE."),
    ("select_num_each_scale", str, "--select-num-each-scale", "Patches per step per scale, e.g. 512+2048. Env: SELECT_NUM_EACH_SCALE."),
    ("look_close_mode", str, "--look-close-mode", None),
    ("smooth_selection_prob", bool, "--smooth-selection-prob/--no-smooth-selection-prob", "Smooth the selection map on a 6x6 grid. Env: SMOOTH_SELECTION_PROB."),
)


def _look_close_parameters(mode_help: str) -> list[inspect.Parameter]:
    return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind],
                              default=typer.Option(None, flag, help=help or mode_help))
            for name, kind, flag, help in _LOOK_CLOSE_FLAGS]


def look_close_options(mode_help: str = MODE_HELP):
    """Give a command the five look-close flags in place of its `look_close: LookCloseFlags`
    parameter (at that parameter's place in the help), and hand it them as one LookCloseFlags."""
    def decorate(command):
        hints = typing.get_type_hints(command)
        params = []
        for p in inspect.signature(command).parameters.values():
            if p.name == "look_close":
                params += _look_close_parameters(mode_help)
            else:
                params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY,     # typer passes keywords
                                         annotation=hints.get(p.name, p.annotation)))

        @functools.wraps(command)
        def wrapper(**kwargs):
            flags = LookCloseFlags(**{name: kwargs.pop(name) for name, *_ in _LOOK_CLOSE_FLAGS})
            return command(look_close=flags, **kwargs)

        wrapper.__signature__ = inspect.Signature(params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper
    return decorate


# the same rule as model/config.whole_number (ASCII digits only), kept here because importing
# ps3edge.model would bring torch into every command's start-up
_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]+")
_DECIMAL_NUMBER = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _strict_number(kind: type, low, high):
    """The parser of one int or float option: ASCII digits only (Python's int() and float() would
    also take '1_0', full-width and other Unicode digits, 'inf' and 'nan'), finite, and inside the
    option's min / max, which typer stops checking once an option has a parser of its own. Typer
    checks values with pydantic, which shows a PydanticCustomError's text as it is."""
    what = "a whole number" if kind is int else "a number"
    pattern = _WHOLE_NUMBER if kind is int else _DECIMAL_NUMBER

    def refuse(reason: str):
        return PydanticCustomError("ps3edge_number", "{reason}", {"reason": reason})

    def parse(value):
        if isinstance(value, bool):
            raise refuse(f"{value!r} is not {what}")
        if isinstance(value, (int, float)) and (kind is float or isinstance(value, int)):
            number = kind(value)                # a default from the command's signature
        else:
            text = str(value).strip()
            if not pattern.fullmatch(text):
                if _non_finite(text):
                    raise refuse(f"'{value}' is not a finite number")
                raise refuse(f"'{value}' is not {what} in plain digits (like 12{'' if kind is int else ' or 0.5'})")
            if len(text) > 40:          # int() of thousands of digits is slow, and no option wants them
                raise refuse(f"'{text[:12]}...' has {len(text)} characters; no option takes a number that long")
            number = kind(text)
        if kind is float and not math.isfinite(number):
            raise refuse(f"'{value}' is not a finite number")
        if low is not None and number < low:
            raise refuse(f"{number} is less than the least allowed, {low}")
        if high is not None and number > high:
            raise refuse(f"{number} is more than the most allowed, {high}")
        return number
    return parse


def _non_finite(text: str) -> bool:
    """inf, nan and their spellings, as float() reads them."""
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False


def _number_kind(annotation) -> type | None:
    """int or float for an `int`, `float` or `Optional[...]` of one; None for anything else."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    kind = args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation
    return kind if kind in (int, float) else None


def strict_numbers(command):
    """Give every int and float parameter of a typer command the strict parser above, keeping its
    min / max. The app applies it to each command it registers, so a flag added later is parsed
    the same way without anyone remembering to."""
    annotations = {name: meta.annotation for name, meta in typer.utils.get_params_from_function(command).items()}
    for param in inspect.signature(command).parameters.values():      # the OptionInfo typer will read, not a copy
        info, kind = param.default, _number_kind(annotations.get(param.name))
        if kind is None or not isinstance(info, typer.models.ParameterInfo):
            continue
        if info.clamp:
            raise TypeError(f"{param.name}: a clamped number option would take any value; ps3edge refuses out-of-range ones")
        info.parser = _strict_number(kind, info.min, info.max)
    return command


def parse_layers(text: str) -> list[int]:
    try:
        layers = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        layers = []
    if not layers:
        raise Ps3EdgeError(f"--layers must be comma-separated integers like -2,-1, got '{text}'")
    return layers


def parse_steps(text: str) -> list[int]:
    """bench's --num-look-close sweep: distinct step counts >= 1."""
    try:
        steps = [int(x) for x in text.split(",")]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1 or len(set(steps)) != len(steps):
        raise Ps3EdgeError(f"--num-look-close must be distinct whole numbers >= 1, comma-separated like 1,2,6; "
                           f"got '{text}'")
    return steps


_DURATION = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ms|s|m|h)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str, flag: str = "--every") -> float:
    """A duration -> seconds: plain digits with an optional unit and no blank between them,
    '2s', '500ms', '1.5m', '1h', or plain seconds '2'; above 0 and at most
    STREAM_ASK_EVERY_MAX_S. No sign, exponent, 'inf' or Unicode digits (the rule of the numbers)."""
    raw = str(text)
    m = _DURATION.fullmatch(raw.strip())
    if not m or len(raw) > 40:
        raise Ps3EdgeError(f"{flag} '{raw[:40]}' is not a duration: give plain digits and a unit, like 2s, 500ms, "
                           f"1m or 1h (plain digits are seconds)")
    seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if not 0 < seconds <= defaults.STREAM_ASK_EVERY_MAX_S:
        raise Ps3EdgeError(f"{flag} {raw.strip()} must be above 0 and at most {defaults.STREAM_ASK_EVERY_MAX_S:g} s")
    return seconds


def load_prompt_embedding(path: Optional[Path]):
    if path is None:
        return None
    expect_file(path, "prompt embedding file")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError / OSError / UnpicklingError for bad files
        raise Ps3EdgeError(f"{path} is not a .npy array ({type(e).__name__}: {e})") from None
    if not isinstance(array, np.ndarray):       # np.load opens an .npz archive, whatever the file is called
        array.close()
        raise Ps3EdgeError(f"{path} is not a .npy array (it is an .npz archive)")
    if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
        raise Ps3EdgeError(f"the prompt embedding {path} must hold finite numbers (it has NaN, inf or non-numbers)")
    return array


def checkpoint_spec(spec: str, revision: Optional[str], files, progress) -> str:
    """A --model / --model-path value with --revision folded in (owner/name@REVISION). A hub id is
    found in the Hugging Face cache, or downloaded into it, here: before any spinner, which would
    hide the download's progress bars; the command then finds it in the cache. `files`: what the
    command reads of the checkpoint (a hub.CheckpointFiles); `progress`: where the download says so."""
    from ..model.hub import locate, parse_hub_id, with_revision

    spec = with_revision(spec, revision)
    if parse_hub_id(spec) is not None:
        locate(spec, files, progress)
    return spec
