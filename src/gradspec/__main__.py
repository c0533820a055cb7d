"""`python -m gradspec` runs the CLI."""

from .cli import run

run()
