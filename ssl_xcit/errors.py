"""The one exception type for mistakes a user can fix (bad path, key, value, checkpoint).

The CLI prints its message as a single line and exits non-zero; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, described in one line naming the culprit."""


class RunStopped(Exception):
    """A run that stopped itself for a reason it states in one line (non-finite loss, collapse);
    its last checkpoint is whole. The CLI prints the line and exits with 1."""
