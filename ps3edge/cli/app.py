"""The typer app (its commands, in the order `--help` lists them), the error net and `main()`.

The net: a command's `Ps3EdgeError` or `OSError` becomes one line `error: ...` on stderr and exit
code 2 (`handle_errors`, around every command); typer's usage errors become one such line with
click's exit code 2; Ctrl-C prints `interrupted` and exits 130, SIGTERM unwinds the same way
(`sigterm_unwinds`), prints `terminated` and exits 143; any other exception becomes one line
`error: <what> (<type>); ...` and exit code 2, or its traceback when PS3EDGE_DEBUG is set
(`main`). `typer.Exit` and `SystemExit` pass through with their own codes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from typing import Optional, Sequence

import typer

from ..version import __version__
from ..errors import Ps3EdgeError, Terminated
from . import artifacts, chat, doctor, extract, run, serve, serve_openai, stream
from .options import strict_numbers
from .views import err_console, error_line

DEBUG_ENV = "PS3EDGE_DEBUG"
ERROR_EXIT = 2                          # a refused input, a failed file operation, or an unforeseen error
INTERRUPTED_EXIT = 130                  # 128 + SIGINT, as a shell reports Ctrl-C
TERMINATED_EXIT = 143                   # 128 + SIGTERM, as a shell reports a terminated job


def _exception_classes(name: str) -> tuple[type, ...]:
    """Every class called `name` where this typer keeps click's exceptions: typer 0.29 vendors its
    own click (without Abort, which moved to typer.exceptions), older ones use click itself. A
    class missing from this version is left out, so an `except` on the tuple never fails."""
    places = (sys.modules[typer.BadParameter.__module__], typer, sys.modules.get("typer.exceptions"),
              sys.modules.get("click.exceptions"))
    found = (getattr(place, name, None) for place in places if place is not None)
    return tuple(dict.fromkeys(c for c in found if isinstance(c, type) and issubclass(c, BaseException)))


USAGE_ERRORS = _exception_classes("ClickException")     # UsageError, BadParameter, NoSuchOption, ...
EXITS = _exception_classes("Exit")                       # typer.Exit: RuntimeError subclasses, not errors
ABORTS = _exception_classes("Abort")                     # what typer makes of EOF on stdin


def _terminate(signum, frame):
    # a second SIGTERM while the first one unwinds ends the process at once, as by default
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


@contextlib.contextmanager
def sigterm_unwinds():
    """While a command runs, SIGTERM raises `Terminated` instead of ending the process on the spot,
    which would leave bench's, parity's and calibration's temporary directories (an exported
    artifact each, up to gigabytes) and an export's staging behind. Only in the main thread and
    only where SIGTERM still has its default action: a host program's own handler is kept."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _stopped(e: BaseException) -> int:
    """Ctrl-C, EOF at a prompt or SIGTERM: one word on stderr; the shell's exit code for it."""
    if isinstance(e, Terminated):
        err_console.print("terminated")
        return TERMINATED_EXIT
    err_console.print("interrupted")
    return INTERRUPTED_EXIT


def handle_errors(fn):
    """Around every command: the errors a command expects to meet become one line and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Ps3EdgeError as e:
            error_line(str(e))
            raise typer.Exit(ERROR_EXIT)
        except OSError as e:     # a file the command reads or writes: permissions, space, a directory in the way
            where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
            error_line(f"{e.strerror or type(e).__name__}{': ' + where if where else ''}")
            raise typer.Exit(ERROR_EXIT)
        except KeyboardInterrupt as e:
            raise typer.Exit(_stopped(e))
    return wrapper


def version():
    """Print the ps3edge version."""
    print(__version__)


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="PS3 / VILA-HD from PyTorch to ONNX and TensorRT, and the look-close runtime.")
for _command in (artifacts.export, artifacts.build, artifacts.calibrate, run.run, run.demo, run.parity,
                 artifacts.inspect, run.bench, extract.extract, stream.stream, chat.chat, serve.serve,
                 serve_openai.serve_openai, serve.triton_repo, doctor.doctor, version):
    app.command()(handle_errors(strict_numbers(_command)))
del _command


def _unforeseen(e: Exception) -> None:
    what = " ".join(str(e).split()) or "unexpected error"
    error_line(f"{what} ({type(e).__name__}); set {DEBUG_ENV}=1 to see the traceback")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The console script (`argv`: the arguments, for a caller in the same process; default: the
    command line). Exits with the command's code; every error is one `error:` line on stderr."""
    try:
        with sigterm_unwinds():
            code = app(args=None if argv is None else list(argv), prog_name=None if argv is None else "ps3edge",
                       standalone_mode=False)
    except EXITS as e:
        code = e.exit_code
    except USAGE_ERRORS as e:
        command = e.ctx.command_path if getattr(e, "ctx", None) is not None else "ps3edge"
        if e.format_message():                       # (no arguments at all: the help was printed)
            error_line(f"{e.format_message()} (see '{command} --help')")
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, *ABORTS) as e:
        sys.exit(_stopped(e))
    except Exception as e:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        _unforeseen(e)
        sys.exit(ERROR_EXIT)
    sys.exit(code if isinstance(code, int) else 0)
