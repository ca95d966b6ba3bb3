"""One module per `lorakit` sub-command, each with `add_parser(subparsers)` and the `run` it binds."""
