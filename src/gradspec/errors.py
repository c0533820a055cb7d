"""User-facing errors: raised for bad input, printed by the CLI without a traceback."""

from __future__ import annotations


class GradspecError(Exception):
    """An error caused by the user's input or options, with a message that says how to fix it."""


class RunMismatchError(GradspecError):
    """A run directory holds results of other inputs (or an older format), so a resume
    into it is refused: results are never mixed."""


class GradspecWarning(UserWarning):
    """Something the user should know about the input (e.g. examples truncated); the CLI
    prints it as one yellow line and carries on."""


class DataError(GradspecError):
    """Bad training data: names the file, the line (1-based) or row (0-based), and the field."""

    def __init__(
        self,
        path: str,
        line: int | None,
        message: str,
        field: str | None = None,
        row: int | None = None,
    ):
        if line is not None:
            where = f"{path}:{line}"
        elif row is not None:
            where = f"{path}: row {row}"
        else:
            where = str(path)
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{message}")
        self.path, self.line, self.row, self.field = path, line, row, field
