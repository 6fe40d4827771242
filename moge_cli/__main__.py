"""`python -m moge_cli` runs the CLI."""

from moge_cli.main import main

main()
