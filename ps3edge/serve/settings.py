"""The server's options, and a request's look-close settings: the server's flags (and the five
environment variables, as `ps3edge run` reads them) overridden by the request's parameters, and
validated by the same runtime code `run` uses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Optional

from ..errors import Ps3EdgeError
from ..runtime.planning import LookCloseSettings, Geometry, parse_bool, settings_from_env, step_counts

# request parameter -> the runtime's keyword (the parameters carry the `run` flags' names)
LOOK_CLOSE_PARAMETERS = {
    "num_look_close": "num_look_close",
    "num_token_look_close": "num_token_look_close",
    "select_num_each_scale": "select_num_each_scale",
    "look_close_mode": "mode",
    "smooth_selection_prob": "smooth_selection_prob",
}
LOOPBACK = "127.0.0.1"
EXIT_TIMEOUT_MAX_S = 25                 # PyTriton kills tritonserver 30 s after asking it to stop


@dataclass(frozen=True)
class ServeOptions:
    """What `ps3edge serve` was started with (ports 0: Triton's defaults are not used, the caller
    picks; every field has the flag of the same name)."""
    backend: str = "onnxruntime"
    precision: str = "fp32"
    llm_precision: str = "fp32"          # a VILA-HD artifact's LLM: fp32, or int4 (`calibrate --precision int4`)
    address: str = LOOPBACK
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 8
    max_queue_delay_us: int = 2000
    instances: int = 1
    max_queue_size: int = 64
    queue_timeout_ms: int = 60_000
    exit_timeout_s: int = 20

    def check(self) -> "ServeOptions":
        """Refuse values Triton would refuse later with a longer message."""
        ports = {"--http-port": self.http_port, "--grpc-port": self.grpc_port, "--metrics-port": self.metrics_port}
        for flag, port in ports.items():
            if not 1 <= port <= 65535:
                raise Ps3EdgeError(f"{flag} must be a port between 1 and 65535, got {port}")
        if len(set(ports.values())) != len(ports):
            raise Ps3EdgeError(f"the HTTP, gRPC and metrics ports must differ, got {', '.join(map(str, ports.values()))}")
        for flag, value, least in (("--max-batch", self.max_batch, 1), ("--instances", self.instances, 1),
                                   ("--max-queue-delay-us", self.max_queue_delay_us, 0),
                                   ("--max-queue-size", self.max_queue_size, 1),
                                   ("--queue-timeout-ms", self.queue_timeout_ms, 1),
                                   ("--exit-timeout-s", self.exit_timeout_s, 1)):
            if value < least:
                raise Ps3EdgeError(f"{flag} must be at least {least}, got {value}")
        if self.exit_timeout_s > EXIT_TIMEOUT_MAX_S:
            raise Ps3EdgeError(f"--exit-timeout-s must be at most {EXIT_TIMEOUT_MAX_S} (PyTriton stops waiting for "
                               f"tritonserver after 30 s), got {self.exit_timeout_s}")
        return self


def _parameter_text(name: str, value) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise Ps3EdgeError(f"request parameter {name} must be a string or an integer, got {value!r}")
    text = str(value)
    if not text.strip():
        raise Ps3EdgeError(f"request parameter {name} is empty; leave it out to use the server's setting")
    return text


@dataclass(frozen=True)
class LookCloseDefaults:
    """The server's look-close flags as given (None: not given, so the environment or the default
    decides), in the form `settings_from_env` takes."""
    num_look_close: Optional[str] = None
    num_token_look_close: Optional[str] = None
    select_num_each_scale: Optional[str] = None
    mode: Optional[str] = None
    smooth_selection_prob: Optional[bool] = None

    def settings(self, parameters: Optional[Mapping] = None, known: tuple[str, ...] = ()) -> LookCloseSettings:
        """These flags, overridden by a request's look-close parameters; other parameters named in
        `known` belong to the model and are passed over, any other name is refused."""
        overrides = {}
        for name, value in (parameters or {}).items():
            if name in LOOK_CLOSE_PARAMETERS:
                key = LOOK_CLOSE_PARAMETERS[name]
                overrides[key] = (parse_bool(name, value) if key == "smooth_selection_prob"
                                  else _parameter_text(name, value))
            elif name not in known:
                names = ", ".join([*LOOK_CLOSE_PARAMETERS, *known])
                raise Ps3EdgeError(f"unknown request parameter '{name}' (this model takes {names})")
        flags = dataclasses.asdict(self)
        if "num_look_close" in overrides and "num_token_look_close" not in overrides:
            flags["num_token_look_close"] = None     # a step count asked for replaces the server's token count
        flags.update(overrides)
        return settings_from_env(**flags)


def checked_settings(defaults: LookCloseDefaults, parameters: Optional[Mapping], geometry: Geometry,
                     known: tuple[str, ...] = ()) -> LookCloseSettings:
    """A request's settings, refused (one line naming the setting) where this model cannot take them."""
    settings = defaults.settings(parameters, known)
    step_counts(settings, geometry)                 # the range checks `run` makes before any work
    return settings
