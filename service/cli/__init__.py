"""The `strokes` command: one parser, a module per subcommand group."""
