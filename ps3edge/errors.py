"""The one exception type users see, and the one a stop signal becomes.

Anything raised as `Ps3EdgeError` reaches the command line as a single line `error: ...` and
exit code 2; anything else is a bug and keeps its traceback. `Terminated` is SIGTERM, raised
by the command line's handler the way Ctrl-C raises KeyboardInterrupt.
"""


class Ps3EdgeError(Exception):
    """A problem with the user's input, files or environment, explained in one line."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler's stop, `timeout`, `kill`) while a command runs. A KeyboardInterrupt,
    so it unwinds through every `with` and `finally` that Ctrl-C does and nothing that catches
    Exception stops it: temporary directories, staging and locks are cleared on the way out."""
