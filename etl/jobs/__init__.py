"""One module per job; each exposes add_parser(subparsers)."""
