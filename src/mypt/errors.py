"""The one exception type for user mistakes. The CLI prints its message and exits with status 2."""


class MyPTError(Exception):
    """A problem the user can fix: bad input, a bad flag, a broken file. The message says how."""


class ReportedElsewhere(MyPTError):
    """An error every process of a torchrun run has, raised on the ranks other than 0.

    Rank 0 prints the message; the others exit with status 2 without printing it again.
    """
