"""Shared fixtures: exported tiny artifacts, PS3 and VILA-HD (once per test session), small test images,
and the runners for the `ps3edge` command line: `cli` (in this process, through `ps3edge.cli.main`),
`cli_process` (the installed console script in a subprocess) and `clean_env`."""

from __future__ import annotations

import contextlib
import io
import locale
import logging
import os
import subprocess
import sys
import tempfile
import traceback
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

LOOK_CLOSE_VARS = ("NUM_LOOK_CLOSE", "NUM_TOKEN_LOOK_CLOSE", "SELECT_NUM_EACH_SCALE", "LOOK_CLOSE_MODE",
                   "SMOOTH_SELECTION_PROB")
SCRIPT = Path(sys.executable).with_name("ps3edge")


def clean_env(columns: str | None = "200", **extra: str) -> dict:
    """os.environ without the look-close variables (so the developer's shell cannot leak in), COLUMNS set to
    `columns` (rich wraps tables at 80 columns when not on a terminal; None leaves COLUMNS as it is), and `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in LOOK_CLOSE_VARS}
    if columns is not None:
        env["COLUMNS"] = columns
    env.update(extra)
    return env


def cli_command() -> list[str]:
    """The installed console script, or `python -m ps3edge.cli` where it is not installed."""
    return [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "ps3edge.cli"]


def cli_process(*args, env: dict | None = None, cwd=None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the installed console script (or `python -m ps3edge.cli` where it is not installed) in a
    subprocess; env defaults to clean_env(). For what only a real process shows: its start-up,
    the entry point, state read at import."""
    return subprocess.run(cli_command() + [str(a) for a in args], env=clean_env() if env is None else env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def cli(*args, env: dict | None = None, cwd=None, timeout: int | None = None) -> subprocess.CompletedProcess:
    """`ps3edge ARGS` run in this process through the console script's own `ps3edge.cli.main` (its
    error net included), as cli_process would run it: under `env` (default clean_env()) and `cwd`,
    stdout and stderr captured separately at the descriptor level, rich's consoles, Python's
    warnings and logging as a fresh process has them. An exception that escapes main() is printed
    as a traceback on stderr with exit code 1, as Python does. `timeout` is accepted for
    cli_process's signature and not enforced."""
    import ps3edge.cli as cli_module

    with _as_a_fresh_process(["ps3edge", *map(str, args)], clean_env() if env is None else env, cwd) as streams:
        try:
            cli_module.main()
            code = 0
        except SystemExit as e:
            code = _exit_status(e.code)
        except KeyboardInterrupt:
            raise                                  # the developer's Ctrl-C: stop the tests
        except BaseException:                      # noqa: B036 - a fresh process would print any of them
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(["ps3edge", *map(str, args)], code, streams["stdout"], streams["stderr"])


def _exit_status(code) -> int:
    """What a process exiting with SystemExit(code) returns to its parent."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


ENCODING = locale.getpreferredencoding(False)      # what a child's pipes and text=True decoding use


class _Capture:
    """File descriptor 1 or 2 sent to a temporary file (so what C libraries write lands there too,
    in order), with a Python text stream over it to stand in for sys.stdout / sys.stderr."""

    def __init__(self, fd: int, errors: str):
        self.fd = fd
        self.file = tempfile.TemporaryFile()
        self.saved = os.dup(fd)
        os.dup2(self.file.fileno(), fd)
        self.stream = io.TextIOWrapper(io.BufferedWriter(io.FileIO(fd, "w", closefd=False)), encoding=ENCODING,
                                       errors=errors, line_buffering=True, write_through=True)

    def text(self) -> str:
        """Restore the descriptor; what was written, decoded with universal newlines as text=True does."""
        self.stream.flush()
        os.dup2(self.saved, self.fd)
        os.close(self.saved)
        self.file.seek(0)
        with io.TextIOWrapper(self.file, encoding=ENCODING, errors="replace") as f:
            return f.read()


def _show_warning(message, category, filename, lineno, file=None, line=None):
    (file or sys.stderr).write(warnings.formatwarning(message, category, filename, lineno, line))


def _fresh_warnings():
    """A fresh interpreter's warning filters (not pytest's, nor the ones pyproject gives pytest),
    printing to the current sys.stderr."""
    warnings.resetwarnings()
    for category in (ResourceWarning, ImportWarning, PendingDeprecationWarning, DeprecationWarning):
        warnings.simplefilter("ignore", category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    warnings.showwarning = _show_warning


@contextlib.contextmanager
def _as_a_fresh_process(argv: list, env: dict, cwd):
    """Process state a subprocess would start with, for the duration; everything restored after.
    Yields a dict that holds "stdout" and "stderr" once the block has ended."""
    from rich.console import Console

    streams: dict = {}
    saved = dict(os.environ), os.getcwd(), sys.argv, sys.stdout, sys.stderr, sys.excepthook
    saved_main = sys.modules["__main__"]
    root = logging.getLogger()
    saved_root = root.handlers[:], root.level
    consoles = [(m, name, value) for key, m in list(sys.modules.items())
                if key == "ps3edge" or key.startswith("ps3edge.") for name, value in list(vars(m).items())
                if isinstance(value, Console)]
    handlers = [h for logger in [root, *logging.root.manager.loggerDict.values()]
                for h in getattr(logger, "handlers", ()) if type(h) is logging.StreamHandler
                and h.stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)]
    handler_streams = [(h, h.stream) for h in handlers]
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    out, err = _Capture(1, "strict"), _Capture(2, "backslashreplace")
    try:
        os.environ.clear()
        os.environ.update(env)
        if cwd is not None:
            os.chdir(cwd)
        sys.argv = argv
        # click names the program after __main__ (`python -m pytest.ps3edge` under `python -m pytest`);
        # the console script's __main__ has no package, so usage errors say `ps3edge`
        sys.modules["__main__"] = types.ModuleType("__main__")
        sys.stdout, sys.stderr = out.stream, err.stream
        # rich fixes a console's width (COLUMNS) and colours (is stdout a terminal?) when it is made,
        # at import: make them again under this environment and these streams, as a new process would
        for module, name, old in consoles:
            setattr(module, name, Console(stderr=old.stderr))
        for h in handlers:
            h.setStream(err.stream if h.stream in (sys.__stderr__, saved[4]) else out.stream)
        root.handlers = []                 # pytest's log capture: a fresh process has none (WARNING goes to stderr)
        root.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            _fresh_warnings()
            yield streams
    finally:
        with contextlib.suppress(Exception):
            import ctypes
            ctypes.CDLL(None).fflush(None)          # C stdio buffers, before the descriptors go back
        streams["stdout"], streams["stderr"] = out.text(), err.text()
        root.handlers = saved_root[0]
        root.setLevel(saved_root[1])
        for h, stream in handler_streams:
            h.setStream(stream)
        for module, name, old in consoles:
            setattr(module, name, old)
        sys.argv, sys.stdout, sys.stderr, sys.excepthook = saved[2:]
        sys.modules["__main__"] = saved_main
        os.chdir(saved[1])
        os.environ.clear()
        os.environ.update(saved[0])


def shared_export(tmp_path_factory, name: str, make) -> Path:
    """The directory `make(out)` exports to, made once per test run: alone, in this session's
    temporary folder; under pytest-xdist, once for all workers (the first to take the lock
    exports, the others wait and read it), since an export costs seconds to tens of seconds."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        out = tmp_path_factory.mktemp(name) / "artifacts"
        make(out)
        return out
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent / f"shared-{name}"   # the run's folder, above the workers'
    root.mkdir(exist_ok=True)
    out, done = root / "artifacts", root / "done"
    with FileLock(str(root / "lock")):
        if not done.exists():
            make(out)
            done.touch()
    return out


def pytest_configure(config):
    """Under pytest-xdist, each worker's torch and onnxruntime take its share of the cores: each would
    otherwise start one thread per core in every worker, and the workers would preempt each other
    (onnxruntime's pools spin while they wait: with two workers on two cores, test_batch.py and
    test_fast.py together took 121 s instead of 95). OMP_NUM_THREADS is how ps3edge's onnxruntime
    sessions are told, here and in the commands the tests start."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if "PYTEST_XDIST_WORKER" in os.environ and workers > 1:
        import torch

        share = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(share)
        torch.set_num_threads(share)


# Every test file, longest first (pytest --durations=0 on 2 cores: from about 80 s down to 1 s).
# pytest-xdist hands out one file at a time to whichever worker is free; a long file handed out
# last runs alone while the other workers have nothing left to do, so the short files go last.
LONGEST_FIRST = ("test_batch.py", "test_fast.py", "test_precision.py", "test_cli.py", "test_parity.py",
                 "test_bad_input.py", "test_artifact.py", "test_vila.py", "test_hub.py", "test_serve.py",
                 "test_engines.py", "test_runners.py", "test_docs.py", "test_api.py", "test_throughput.py",
                 "test_extract.py", "test_weights.py", "test_doctor.py", "test_validation.py",
                 "test_ort_optimize.py", "test_hardening.py", "test_planning.py", "test_lint.py",
                 "test_cli_errors.py", "test_layers.py", "test_projector.py", "test_llm_engine.py")


def pytest_collection_modifyitems(config, items):
    """The files in LONGEST_FIRST go first, in that order; the rest follow as collected (the sort is
    stable, so the tests of a file keep their order)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 4 (each holds torch and its models in memory;
    more workers than the test files that take long gain nothing)."""
    return max(1, min(os.cpu_count() or 1, 4))


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """preset name -> exported artifact directory (ps3-tiny and ps3-tiny-4k, seed 0; read-only: tests
    that change one work on a copy)."""
    from ps3edge.exporter.onnx_export import export   # here: pytest-xdist's controller never needs torch

    cache = {}

    def get(preset: str = "ps3-tiny"):
        if preset not in cache:
            cache[preset] = shared_export(tmp_path_factory, preset, lambda out: export(preset, out))
        return cache[preset]

    return get


@pytest.fixture(scope="session")
def vila_art(tmp_path_factory):
    """The exported vila-hd-tiny artifact (read-only: tests that change it work on a copy)."""
    from ps3edge.llm.export import export_vila

    return shared_export(tmp_path_factory, "vila", lambda out: export_vila("vila-hd-tiny", out))


@pytest.fixture
def ps3_copy(artifacts, tmp_path) -> Path:
    """A copy of the ps3-tiny artifact (seed 0) to change or overwrite."""
    import shutil

    return Path(shutil.copytree(artifacts("ps3-tiny"), tmp_path / "art"))


@pytest.fixture
def vila_copy(vila_art, tmp_path) -> Path:
    """A copy of the vila-hd-tiny artifact to change or overwrite."""
    import shutil

    return Path(shutil.copytree(vila_art, tmp_path / "vila"))


def random_image(width=320, height=240, seed=0, mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    # smooth structure as well as noise, so the selector's ranking is not flat
    yy, xx = np.mgrid[0:height, 0:width]
    rgb[..., 0] = ((np.sin(xx / 17.0 + seed) + 1) * 127).astype(np.uint8)
    img = Image.fromarray(rgb, "RGB")
    return img if mode == "RGB" else img.convert(mode)


@pytest.fixture
def image():
    return random_image()


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "input.png"
    random_image().save(path)
    return path
