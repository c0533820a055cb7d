"""User-facing errors: raised for bad input, printed by the CLI without a traceback."""

from __future__ import annotations


class GradspecError(Exception):
    """An error caused by the user's input or options, with a message that says how to fix it."""


class DataError(GradspecError):
    """Bad training data: names the file, the line (1-based) and the field at fault."""

    def __init__(self, path: str, line: int | None, message: str, field: str | None = None):
        where = f"{path}:{line}" if line is not None else str(path)
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{message}")
        self.path, self.line, self.field = path, line, field
