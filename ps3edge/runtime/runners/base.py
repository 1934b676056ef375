"""The one interface every stage backend runs behind: `StageRunner`.

A runner is one exported stage (lowres, selector, highres, or VILA-HD's projector) on one
backend. It is built from a *loader* - a callable returning what the backend executes (an
onnxruntime session, a torch module, a TensorRT engine and its context) - and activates it on
first use, as Polygraphy's runners do (polygraphy/backend/base/runner.py): the backends'
`load_stages` activate every runner at once, so a broken file is refused when a pipeline loads,
not halfway through its first image.

    runner.infer({"pixels": x})  ->  {"lowres_features": ..., "kv_cache": ..., ...}

Arrays cross the interface as numpy, keyed by tensor name. `max_steps_per_call` is the most
look-close steps (axis T) one call takes (None: no limit); the runtime groups its highres calls
to fit it (lookclose.highres_feeds), and a runner refuses a larger call instead of splitting it.
`close()` frees the session, engine, buffers; `with runner:` closes on exit; a closed runner
refuses further calls in one line.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ...errors import Ps3EdgeError


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

    def __init__(self, name: str, entry, loader: Callable, device: str = "cpu",
                 max_steps_per_call: int | None = None):
        self.name = name
        self.entry = entry
        self.device = device
        self.max_steps_per_call = max_steps_per_call
        self._loader = loader
        self.is_active = False
        self.closed = False
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

    def infer(self, feed: dict) -> dict[str, np.ndarray]:
        """numpy inputs keyed by tensor name -> numpy outputs keyed by tensor name."""
        self.activate()
        self.check_steps(feed)
        return self._infer(feed)

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


def close_all(runners) -> None:
    """Close every runner of a `load_stages` dict (or any iterable of runners)."""
    for runner in (runners.values() if isinstance(runners, dict) else runners):
        runner.close()
