"""The one interface every stage backend runs behind: `StageRunner`.

A runner is one exported stage (lowres, selector, highres, or VILA-HD's projector) on one
backend. It is built from a *loader* - a callable returning what the backend executes (an
onnxruntime session, a torch module, a TensorRT engine and its context) - and activates it on
first use, as Polygraphy's runners do (polygraphy/backend/base/runner.py): the backends'
`load_stages` activate every runner at once, so a broken file is refused when a pipeline loads,
not halfway through its first image.

    runner.infer({"pixels": x})  ->  {"lowres_features": ..., "kv_cache": ..., ...}

Arrays cross the interface as numpy, keyed by tensor name. Before a call runs, the feed is
held against the inputs the runner declares (`input_metadata`), as Polygraphy's `infer` does:
every declared name and no other, each tensor's dtype, rank and fixed dimensions; the dynamic
axes ("B", "T", "N", or a session's own names) are free, up to the bounds the runner declares
(`axis_bounds`). A mismatch is one Ps3EdgeError line naming the stage, the tensor, what was given
and what is declared, instead of a backend's own error from deep inside the session.
`max_steps_per_call` is the most look-close steps (axis T) one call takes (None: no limit); the
runtime groups its highres calls to fit it (lookclose.highres_feeds), and a runner refuses a
larger call instead of splitting it. A runner times its own calls: `last_inference_time()` is
the wall time of the last one, in seconds. `close()` frees the session, engine, buffers;
`with runner:` closes on exit; a closed runner refuses further calls in one line.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from ...errors import Ps3EdgeError
from ..device import CPU, Device


class StageRunner:
    """One stage on one backend: `infer(feed) -> outputs`, with a lifecycle.

    Subclasses set `backend`, implement `_activate(loaded)` (keep what the loader returned) and
    `_infer(feed)`, and `_release()` (drop it again). `entry` is the manifest's StageEntry for
    the stage (its tensors' names, dtypes and shapes); a backend that can read them from the
    loaded model may leave it None and override `input_names` / `output_names` /
    `input_metadata`.
    """

    backend = "base"
    kind = "stage"                       # how a refusal names the runner: "stage", or "engine" (TensorRT)

    def __init__(self, name: str, entry, loader: Callable, device: Device = CPU,
                 max_steps_per_call: int | None = None):
        self.name = name
        self.entry = entry
        self.device = device
        self.max_steps_per_call = max_steps_per_call
        self._loader = loader
        self.is_active = False
        self.closed = False
        self._last_time: float | None = None
        # the T axis (look-close steps) of every tensor that has one, from the declared shapes
        self.step_axes = {} if entry is None else {
            t.name: t.shape.index("T") for t in entry.inputs + entry.outputs if "T" in t.shape}

    # --- what the stage takes and gives --------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return self.entry.input_names

    @property
    def output_names(self) -> list[str]:
        return self.entry.output_names

    def input_metadata(self) -> dict[str, tuple[str, tuple]]:
        """name -> (numpy dtype name, shape); dynamic axes are named ("T", "N")."""
        return {t.name: (t.dtype, tuple(t.shape)) for t in self.entry.inputs}

    def axis_bounds(self) -> dict[str, int]:
        """Dynamic axis -> the most this runner takes along it (the look-close steps T of a call)."""
        return {} if self.max_steps_per_call is None else {"T": self.max_steps_per_call}

    @property
    def device_label(self) -> str:
        """How a report names where this runner computes (onnxruntime: its provider)."""
        return str(self.device)

    # --- lifecycle -------------------------------------------------------------------------------
    def activate(self) -> "StageRunner":
        """Run the loader (once); errors surface here as one-line Ps3EdgeErrors."""
        self._refuse_if_closed()
        if not self.is_active:
            self._activate(self._loader())
            self.is_active = True
        return self

    def close(self) -> None:
        """Free what the loader made (session, engine, buffers); later calls are refused."""
        if self.is_active:
            self._release()
            self.is_active = False
        self.closed = True

    def __enter__(self) -> "StageRunner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.close()

    def _refuse_if_closed(self) -> None:
        if self.closed:
            raise Ps3EdgeError(f"the {self.backend} runner of stage '{self.name}' is closed; load the stages again")

    # --- running -----------------------------------------------------------------------------------
    def steps_in(self, feed: dict) -> int | None:
        """The look-close steps (axis T) of a call, or None when the stage has no T axis."""
        return next((feed[n].shape[a] for n, a in self.step_axes.items() if n in feed), None)

    def check_steps(self, feed: dict) -> None:
        """Refuse a call with more steps than this runner takes (the runtime groups its calls)."""
        steps = self.steps_in(feed)
        if self.max_steps_per_call is not None and steps is not None and steps > self.max_steps_per_call:
            raise Ps3EdgeError(f"{self.kind} '{self.name}' takes at most {self.max_steps_per_call} steps per call, "
                               f"got {steps}")

    def check_feed(self, feed: dict) -> None:
        """Refuse a feed that does not match the declared inputs, in one line (see the module docstring)."""
        declared = self.input_metadata()
        missing = [n for n in declared if n not in feed]
        extra = [n for n in feed if n not in declared]
        if missing or extra:
            what = f"no input '{missing[0]}'" if missing else f"an input '{extra[0]}' it does not take"
            raise Ps3EdgeError(f"{self.kind} '{self.name}' was fed {what}: given {sorted(feed)}, "
                               f"declared {list(declared)}")
        self.check_steps(feed)
        bounds = self.axis_bounds()
        for name, (dtype, shape) in declared.items():
            value = feed[name]
            given_dtype, given_shape = _dtype_name(value), tuple(getattr(value, "shape", ()))
            fits = (given_dtype == dtype and len(given_shape) == len(shape)
                    and all(_dim_fits(g, d, bounds) for g, d in zip(given_shape, shape)))
            if not fits:
                raise Ps3EdgeError(f"{self.kind} '{self.name}' input '{name}': given {given_dtype} "
                                   f"{_shape_text(given_shape)}, declared {dtype} {_shape_text(shape)}"
                                   + _bounds_text(shape, bounds))

    def infer(self, feed: dict) -> dict[str, np.ndarray]:
        """numpy inputs keyed by tensor name -> numpy outputs keyed by tensor name."""
        self.activate()
        self.check_feed(feed)
        start = time.perf_counter()
        outputs = self._infer(feed)
        self._last_time = time.perf_counter() - start
        return outputs

    def last_inference_time(self) -> float | None:
        """Wall time of the last call, in seconds (a backend's call returns when its outputs are
        ready, so this is the stage's time); None before the first call."""
        return self._last_time

    # --- what a backend implements ---------------------------------------------------------------
    def _activate(self, loaded) -> None:
        raise NotImplementedError

    def _infer(self, feed: dict) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        state = "closed" if self.closed else "active" if self.is_active else "not loaded"
        return f"<{type(self).__name__} {self.name!r} on {self.device}, {state}>"


def _dtype_name(value) -> str:
    """numpy's name of a numpy array's or torch tensor's dtype ("float32"), else the value's type."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return type(value).__name__
    return getattr(dtype, "name", None) or str(dtype).removeprefix("torch.")


def _dim_fits(given: int, declared, bounds: dict[str, int]) -> bool:
    """A fixed dimension must be equal; a dynamic one (named, or unnamed) any size up to its bound, if any."""
    if isinstance(declared, int):
        return given == declared
    return given <= bounds.get(declared, given)


def _shape_text(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _bounds_text(shape, bounds: dict[str, int]) -> str:
    named = [f"{d} <= {bounds[d]}" for d in dict.fromkeys(shape) if isinstance(d, str) and d in bounds]
    return f" with {', '.join(named)}" if named else ""


def close_all(runners) -> None:
    """Close every runner of a `load_stages` dict (or any iterable of runners)."""
    for runner in (runners.values() if isinstance(runners, dict) else runners):
        runner.close()
