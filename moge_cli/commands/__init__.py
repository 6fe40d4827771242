"""One module per `moge` subcommand: parse options, call the library function, render."""
