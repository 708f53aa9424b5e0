"""The one exception type for user mistakes. The CLI prints its message and exits with status 2."""


class MyPTError(Exception):
    """A problem the user can fix: bad input, a bad flag, a broken file. The message says how."""
