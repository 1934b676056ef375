"""The `ps3edge` command line: demo, export, build, calibrate, run, chat, parity, inspect (--lint), bench, doctor.

Every command turns a `Ps3EdgeError` into one line `error: ...` on stderr and exit code 2.
Look-close settings default to the VILA-HD environment variables (NUM_LOOK_CLOSE,
NUM_TOKEN_LOOK_CLOSE, SELECT_NUM_EACH_SCALE, LOOK_CLOSE_MODE, SMOOTH_SELECTION_PROB); flags
override them.

Modules, top down: app (the typer app, the error net, main), the commands (artifacts, run, chat,
doctor), options (shared options and their parsing), views (everything printed).
"""

from .app import app, main

__all__ = ["app", "main"]
