"""The one exception type for mistakes the user can fix (config, files, columns, URIs).

The CLI prints it as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """Bad input: the message names what is wrong and where."""
