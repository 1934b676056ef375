"""Triton through PyTriton with its administrative endpoints locked, and nothing on tritonserver's
command line that opens them.

tritonserver takes its restricted-API settings (`--http-restricted-api`, `--grpc-restricted-protocol`:
`<apis>:<header>=<value>`) from its command line only, which every local user reads (`ps`), and
PyTriton 0.7 puts its access token there. So the token is not used: PyTriton writes the models into
its repository before tritonserver starts (its local model store), tritonserver loads them at start-up,
and no call to the locked endpoints is needed afterwards. The locked endpoints then ask for a header
whose name holds a colon: HTTP/1.1 ends a header name at its first colon and HTTP/2 (gRPC) refuses a
name with one, so no client can send it, and what the command line shows opens nothing.

This drives three of PyTriton 0.7's private attributes (the serve extra pins that version exactly);
`check_private_api` refuses, in one line, a PyTriton without them.
"""

from __future__ import annotations

import atexit
import contextlib
import secrets

from ..errors import Ps3EdgeError

# what changes or exposes the server; health, metadata, model config, inference and statistics stay open
LOCKED_APIS = ("model-repository", "shared-memory", "trace", "logging")
UNSENDABLE_HEADER = "ps3edge:locked"     # a colon: no HTTP/1.1 or HTTP/2 client can send this name
RESTRICTED_FLAGS = ("http-restricted-api", "grpc-restricted-protocol")


def lock_value() -> str:
    """The restricted-API setting: the locked APIs behind a header nobody can send (the value is
    random only so that two servers never share one)."""
    return f"{','.join(LOCKED_APIS)}:{UNSENDABLE_HEADER}={secrets.token_urlsafe(16)}"


def check_private_api(triton) -> None:
    for name in ("_triton_server_config", "_run_server", "_log_level_checker", "_triton_server", "_workspace"):
        if not hasattr(triton, name):
            raise Ps3EdgeError(f"this PyTriton has no Triton.{name}; ps3edge serve needs nvidia-pytriton 0.7.0 "
                               "(pip install 'ps3edge[serve]')")


@contextlib.contextmanager
def locked_triton(triton_module, config):
    """A PyTriton `Triton` (not started: bind the models, then `start_locked`) whose tritonserver
    gets the lock instead of PyTriton's token; stopped, its workspace removed, on leaving."""
    triton = triton_module.Triton(
        config=config,
        security_config=triton_module.TritonSecurityConfig(restricted_endpoints=[]),    # no token is made
        triton_lifecycle_policy=triton_module.TritonLifecyclePolicy(launch_triton_on_startup=False,
                                                                    local_model_store=True))
    try:
        check_private_api(triton)
        value = lock_value()
        for flag in RESTRICTED_FLAGS:
            triton._triton_server_config[flag] = value
        yield triton
    finally:
        if triton._triton_server is not None:
            triton.stop()            # SIGINT to tritonserver (it drains), then the workspace is removed
        else:                        # never started: PyTriton's stop() assumes a server
            atexit.unregister(triton.stop)
            triton._workspace.clean()


def start_locked(triton) -> None:
    """Start tritonserver with the bound models and wait until they are ready. PyTriton reads the
    log settings once to warn about verbose logging; the logging endpoint is locked, so that check
    is skipped (ps3edge never turns verbose logging on)."""
    triton._run_server()
    triton._log_level_checker._log_settings = {}
    triton.connect()
