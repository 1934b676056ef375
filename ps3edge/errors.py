"""The one exception type users see.

Anything raised as `Ps3EdgeError` reaches the command line as a single line `error: ...` and
exit code 2; anything else is a bug and keeps its traceback.
"""


class Ps3EdgeError(Exception):
    """A problem with the user's input, files or environment, explained in one line."""
