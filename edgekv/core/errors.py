"""The one error type users see: a one-line message that names the problem and the fix."""


class EdgekvError(Exception):
    """Raised for bad input; the CLI prints `error: <message>` and exits 1, without a traceback."""
