"""Errors a user can fix: the command-line scripts print their message as one line, no traceback.

Anything else (a bug, a library failure we did not foresee) keeps its full traceback.
"""


class UserInputError(Exception):
    """A mistake in the user's flags, files or environment; the message names it and says what to do."""


class ConfigError(UserInputError, ValueError):
    """A training flag or preset field that cannot work; the message names the field."""


class RunInterrupted(UserInputError):
    """Ctrl-C: the message says where the last checkpoint is and how to continue; exit status 130."""

    exit_status = 130
