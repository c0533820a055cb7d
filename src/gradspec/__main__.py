"""`python -m gradspec` runs the CLI."""

from .cli import app

app()
