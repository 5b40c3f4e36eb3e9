"""Errors that reach the user as one line on stderr.

Code raises `MeshchatError` (or a subclass) for anything a user can cause or fix: a missing model,
a bad invite, a peer that went away. The CLI prints its message and exits 1 (`UsageError`: 2).
Any other exception is a bug and shows a traceback only with `--debug`.
"""


class MeshchatError(Exception):
    """A failure with a message fit for the user; exit code 1."""

    exit_code = 1


class UsageError(MeshchatError):
    """The command line itself is wrong; exit code 2."""

    exit_code = 2
