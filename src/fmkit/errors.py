"""The one exception type for user mistakes: the CLI prints its message as one line, never a traceback."""


class FmkitError(Exception):
    """A mistake the user can fix (bad path, bad recipe key, bad checkpoint); the message names what to fix."""
