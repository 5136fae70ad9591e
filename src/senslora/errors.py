"""User-facing errors.

Anything the user can fix (a bad path, an out-of-range number, an empty data set) raises
:class:`SensloraError`. The CLI prints it as one line and exits with status 2; library users can
catch it. Programming errors stay ordinary exceptions with tracebacks.
"""


class SensloraError(ValueError):
    """A problem with the user's input, with a message that says what to do."""
