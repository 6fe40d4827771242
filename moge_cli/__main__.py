"""`python -m moge_cli` runs the CLI."""

from moge_cli.cli import main

main()
