"""The one exception type users see: a message naming what is wrong, never a stack trace."""


class MoespecError(Exception):
    """Bad input or an unusable model folder. The CLI prints `error: <message>` and exits 2."""
