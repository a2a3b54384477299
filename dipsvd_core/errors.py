"""User-facing errors. Every step of the flow raises DipSVDError for a problem the user can fix.

The message names the problem and the fix in one line; the CLI prints it and exits non-zero, the
app shows it in an error box. Anything else escaping the core is a bug.
"""


class DipSVDError(Exception):
    """A problem with the user's input or environment, with its fix in the message."""
