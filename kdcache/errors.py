"""The one exception type that the command line turns into a one-line message."""


class UserError(Exception):
    """Bad input from the user (missing file, wrong checkpoint, mismatched cache).

    The message says what is wrong and what to do; `kdcache` prints it on one line and exits 2,
    without a traceback.
    """
