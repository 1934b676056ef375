"""The ONNX route of `ps3edge build`: one stage's ONNX file -> a serialized TensorRT engine,
built with Polygraphy's TensorRT loaders (polygraphy/backend/trt: loader.py, config.py,
profile.py), which NVIDIA tests against every TensorRT release:

- `NetworkFromOnnxPath(path, strongly_typed=...)`: the builder, the network, and TensorRT's ONNX
  parser reading the file by path, so that the external data next to it is found. The network
  is created STRONGLY_TYPED only on TensorRT 10: TensorRT 11 builds strongly typed networks only.
- `PostprocessNetwork`: on the parsed network, the check that its inputs are the manifest's, then
  the precision map's fp32 layers held (`hold_fp32_layers`).
- `CreateConfig`: the precision flags (fp16 / int8; tf32 off for an fp32 plan), precision
  constraints "obey", the optimization profiles (`Profile().add(name, min, opt, max)`; a
  static stage gets Polygraphy's default profile, filled from the network's own shapes), the
  workspace (`memory_pool_limits`) and the builder optimization level.
- `EngineBytesFromNetwork`: the build.

Written here, and why:
- The precision map step (given to PostprocessNetwork): Polygraphy's SetLayerPrecisions matches
  layers by name only and leaves their output types, while a precision map names ONNX nodes or
  their output tensors and holds the outputs in fp32 too (calibration/precision.py).
- profiling_verbosity: CreateConfig sets DETAILED when given none (config.py, call_impl); the
  engines keep TensorRT's default, LAYER_NAMES_ONLY.
- The timing cache is attached by `attach_timing_cache` (a PostprocessConfig step), not by
  CreateConfig's `load_timing_cache`: CreateConfig replaces a cache that create_timing_cache
  cannot read with an empty one without a word, and does not look at set_timing_cache's result,
  which is False for a cache of another TensorRT or GPU (config.py, call_impl). The builder says
  when it starts an empty cache. The cache is read back from the config after the build, as
  EngineBytesFromNetwork's save_timing_cache does, but without its file: the persistent file is
  replaced atomically by the caller (cache.py).
- Profile refusals: Profile.to_trt lets set_shape's error through without the input's name, and
  CreateConfig does not look at add_optimization_profile's result; after a failure
  `_profile_refusal` finds the input or profile TensorRT refuses, for the one-line message.
- The engine file is not written with SaveEngine, which opens its destination in place
  (util.save_file); builder.py writes engines through a temporary file and a rename.
- The log: Polygraphy logs TensorRT's messages through its G_LOGGER. During a build G_LOGGER goes
  through Python's logging to a handler that keeps errors for the one-line message and passes
  warnings to the progress callback; nothing is printed, and G_LOGGER is restored afterwards.

Polygraphy is imported only when a build starts (platform.import_polygraphy).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from ..artifact.profiles import is_dynamic
from ..errors import Ps3EdgeError
from .plan import BuildOptions, StagePlan, workspace_bytes
from .platform import import_polygraphy, version_tuple

# BuilderFlag name of a plan -> CreateConfig's keyword and value for it
CONFIG_FLAGS = {"FP16": ("fp16", True), "INT8": ("int8", True), "BF16": ("bf16", True), "FP8": ("fp8", True),
                "TF32": ("tf32", True), "OBEY_PRECISION_CONSTRAINTS": ("precision_constraints", "obey"),
                "PREFER_PRECISION_CONSTRAINTS": ("precision_constraints", "prefer")}


# --- the log ---------------------------------------------------------------------------------------
class _BuildLog(logging.Handler):
    """Polygraphy's log (TensorRT's included) during one build: errors are kept for the one-line
    message, warnings go to `say`. Polygraphy's own CRITICAL lines are dropped: it raises them."""

    def __init__(self, say):
        super().__init__(logging.WARNING)
        self.say, self.errors = say, []

    def emit(self, record):
        text = record.getMessage().strip()
        if record.levelno >= logging.CRITICAL:
            return
        if record.levelno >= logging.ERROR:
            self.errors.append(text)
        else:
            self.say(f"TensorRT: {text}")

    def first_error(self, fallback: str) -> str:
        return ((self.errors[0] if self.errors else fallback).splitlines() or [""])[0]

    def last_error(self, fallback: str) -> str:
        return ((self.errors[-1] if self.errors else fallback).splitlines() or [""])[0][:400]


@contextmanager
def polygraphy_log(say):
    """Route Polygraphy's G_LOGGER to a `_BuildLog` for the duration; restored afterwards."""
    from polygraphy.logger import G_LOGGER

    handler, target = _BuildLog(say), logging.getLogger("Polygraphy")
    saved = (G_LOGGER.use_python_logging_system, G_LOGGER.letter, G_LOGGER.colors, target.propagate, target.level)
    G_LOGGER.use_python_logging_system = True           # G_LOGGER now logs to logging.getLogger("Polygraphy")
    G_LOGGER.letter = G_LOGGER.colors = False
    target.addHandler(handler)
    target.propagate = False
    target.setLevel(logging.WARNING)
    try:
        yield handler
    finally:
        target.removeHandler(handler)
        G_LOGGER.use_python_logging_system, G_LOGGER.letter, G_LOGGER.colors, target.propagate, level = saved
        target.setLevel(level)


# --- the loaders (constructed without TensorRT running) -------------------------------------------
def onnx_network(pg, trt, path, plan: StagePlan):
    """Polygraphy's loader of the stage's network, parsed from its ONNX file."""
    strongly_typed = plan.strongly_typed and version_tuple(trt.__version__)[0] < 11
    return pg.NetworkFromOnnxPath(str(path), strongly_typed=strongly_typed)


def profile_bounds_of(plan: StagePlan) -> tuple[dict, ...]:
    """The bounds of each optimization profile the plan adds; none for a static stage. Profile 0
    is plan.profile; more (the LLM's decode profile) follow in order, and the runtime selects
    them with set_optimization_profile_async."""
    return (plan.profile, *plan.extra_profiles) if is_dynamic(plan.profile) or plan.extra_profiles else ()


def plan_profiles(pg, plan: StagePlan):
    """The plan's optimization profiles as Polygraphy Profiles; None for a static stage."""
    profiles = []
    for bounds in profile_bounds_of(plan):
        profile = pg.Profile()
        for name, b in bounds.items():
            profile.add(name, tuple(b["min"]), tuple(b["opt"]), tuple(b["max"]))
        profiles.append(profile)
    return profiles or None


def config_loader(pg, trt, plan: StagePlan, options: BuildOptions):
    """Polygraphy's CreateConfig for the plan: flags, profiles, workspace, optimization level.
    TF32 is TensorRT's default; Polygraphy clears it unless asked, so it is asked for where the
    plan does not clear it."""
    kwargs = {"tf32": "TF32" not in plan.clear_flags and hasattr(trt.BuilderFlag, "TF32")}
    for name in plan.flags:
        if name in CONFIG_FLAGS:
            key, value = CONFIG_FLAGS[name]
            kwargs[key] = value
    return pg.CreateConfig(**kwargs, profiles=plan_profiles(pg, plan),
                           memory_pool_limits={trt.MemoryPoolType.WORKSPACE: workspace_bytes(options.workspace_gb)},
                           builder_optimization_level=options.optimization_level,
                           profiling_verbosity=trt.ProfilingVerbosity.LAYER_NAMES_ONLY)


# --- the steps written here (see the module docstring) --------------------------------------------
def check_flags(trt, plan: StagePlan) -> None:
    """Refuse a plan flag this TensorRT does not have (TensorRT 11 dropped the weak-typing ones)."""
    for name in plan.flags:
        if not hasattr(trt.BuilderFlag, name):
            raise Ps3EdgeError(f"TensorRT {trt.__version__} has no builder flag {name}; stage '{plan.stage}' "
                               f"cannot be built at {plan.precision} this way")


def _check_inputs(network, plan: StagePlan) -> None:
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(names) != sorted(plan.profile):
        raise Ps3EdgeError(f"{plan.onnx_file} has inputs {names}, the manifest says {sorted(plan.profile)}")


def hold_fp32_layers(trt, network, nodes: tuple[str, ...], tensors: tuple[str, ...]) -> int:
    """Hold in fp32 the layers the precision map names (by ONNX node, or by output tensor: the
    parser names layers after their nodes and keeps tensor names); returns how many."""
    if not nodes and not tensors:
        return 0
    from ..calibration.precision import fp32_layer_matcher

    match = fp32_layer_matcher({"fp32_nodes": list(nodes), "fp32_tensors": list(tensors)})
    held = 0
    floating = {trt.float32, trt.float16}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        float_outputs = [j for j, out in enumerate(outputs) if out.dtype in floating]
        # a layer with no floating output (shape arithmetic, integer gathers) has no fp16 to avoid,
        # and an fp32 precision constraint on it could make the builder fail under OBEY
        if not float_outputs or not match(layer.name, [o.name for o in outputs]):
            continue
        layer.precision = trt.float32
        for j in float_outputs:
            layer.set_output_type(j, trt.float32)
        held += 1
    return held


def attach_timing_cache(trt, config, plan: StagePlan, timing: bytes, say) -> None:
    """The plan's leftover flags (those CreateConfig has no keyword for) and the timing cache:
    `timing`, or an empty one (said) where TensorRT cannot read it or it is another machine's."""
    for name in plan.flags:
        if name not in CONFIG_FLAGS:
            config.set_flag(getattr(trt.BuilderFlag, name))
    for name in plan.clear_flags:
        if name != "TF32" and hasattr(trt.BuilderFlag, name):
            config.clear_flag(getattr(trt.BuilderFlag, name))
    try:
        cache = config.create_timing_cache(timing or b"")
    except (RuntimeError, TypeError):                      # a damaged cache file
        cache = None
    if cache is None or not config.set_timing_cache(cache, False):
        say("the timing cache is damaged or was made by another TensorRT or GPU; starting an empty one")
        config.set_timing_cache(config.create_timing_cache(b""), False)


def _profile_refusal(trt, builder, plan: StagePlan) -> Ps3EdgeError | None:
    """After Polygraphy could not add the profiles: the input or profile TensorRT refuses."""
    for bounds in profile_bounds_of(plan):
        profile = builder.create_optimization_profile()
        for name, b in bounds.items():
            try:      # the binding raises RuntimeError for shapes it refuses
                profile.set_shape(name, tuple(b["min"]), tuple(b["opt"]), tuple(b["max"]))
            except RuntimeError as e:
                return Ps3EdgeError(f"TensorRT refused the profile of '{plan.stage}' input '{name}' "
                                    f"{b}: {(str(e).splitlines() or [''])[0]}")
        if not profile:                                    # IOptimizationProfile is false when invalid
            return Ps3EdgeError(f"TensorRT refused an optimization profile of '{plan.stage}': {bounds}")
    return None


def _create_config(pg, trt, builder, network, plan: StagePlan, options: BuildOptions, timing: bytes, say):
    """The builder config: CreateConfig, then `attach_timing_cache`; a profile TensorRT refuses is
    refused in one line."""
    from polygraphy.exception import PolygraphyException

    loader = pg.PostprocessConfig(config_loader(pg, trt, plan, options),
                                  func=lambda builder, network, config: attach_timing_cache(trt, config, plan,
                                                                                            timing, say))
    try:
        config = loader(builder, network)
    except (RuntimeError, PolygraphyException):
        refusal = _profile_refusal(trt, builder, plan)
        if refusal is None:
            raise
        raise refusal from None
    wanted = profile_bounds_of(plan)
    if wanted and config.num_optimization_profiles != len(wanted):
        added = config.num_optimization_profiles
        raise _profile_refusal(trt, builder, plan) or Ps3EdgeError(
            f"TensorRT refused an optimization profile of '{plan.stage}': {wanted[min(added, len(wanted) - 1)]}")
    return config


# --- the route ---------------------------------------------------------------------------------------
def build_from_onnx(trt, artifact_dir: Path, plan: StagePlan, options: BuildOptions, timing: bytes, say):
    """One stage's engine from its ONNX file: (engine bytes, timing cache bytes, layers held in fp32)."""
    pg = import_polygraphy()
    from polygraphy.exception import PolygraphyException

    check_flags(trt, plan)
    held = []
    with polygraphy_log(say) as log:
        loader = pg.PostprocessNetwork(onnx_network(pg, trt, Path(artifact_dir) / plan.onnx_file, plan),
                                       func=lambda network: _check_inputs(network, plan), name="manifest inputs")
        loader = pg.PostprocessNetwork(loader, name="precision map", func=lambda network: held.append(
            hold_fp32_layers(trt, network, plan.fp32_nodes, plan.fp32_tensors)))
        try:
            builder, network, parser = loader()
        except PolygraphyException as e:     # the parser's errors are logged, then Polygraphy raises
            raise Ps3EdgeError(f"TensorRT's ONNX parser rejected {plan.onnx_file}: {log.first_error(str(e))}") from None
        config = _create_config(pg, trt, builder, network, plan, options, timing, say)
        try:
            engine = pg.EngineBytesFromNetwork((builder, network, parser), config=config)()
        except PolygraphyException:
            raise Ps3EdgeError(f"TensorRT could not build stage '{plan.stage}': "
                               f"{log.last_error('see the TensorRT log above')}") from None
        timing = bytes(config.get_timing_cache().serialize())
    return bytes(engine), timing, held[0] if held else 0
