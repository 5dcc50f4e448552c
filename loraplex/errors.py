"""The one exception type users see: a message that says what was wrong, where, and how to fix it."""


class LoraplexError(Exception):
    """A problem with the user's input or environment. The CLI prints it without a traceback and exits 2."""

    def __init__(self, message: str, *, hint: str | None = None):
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  fix: {hint}")
