"""`python -m moge_cli` runs the CLI."""

from moge_cli.main import main

if __name__ == "__main__":  # not again in `--ep` ranks (multiprocessing's spawn imports the main module)
    main()
