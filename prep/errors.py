"""The one exception type for expected failures: the CLI prints it as one line, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or an unusable environment (missing folder, no space, unwritable output)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code
