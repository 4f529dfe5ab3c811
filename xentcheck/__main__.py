"""``python -m xentcheck``: the command line."""

from .cli import cli

cli(prog_name="xentcheck")
