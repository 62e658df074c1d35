"""The `sslflow` subcommands, one module each (see `sslflow.cli`)."""
