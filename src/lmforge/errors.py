"""The error a user can act on.

Anything a user controls (paths, flags, config values, prompts) that is wrong raises `LMForgeError` with a
message that names the problem and the fix. The CLI prints that message on one line and exits with code 2;
anything else is a bug and keeps its traceback.
"""


class LMForgeError(ValueError):
    """A problem with the user's input, with a message that says what to do."""
