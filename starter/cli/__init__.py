"""The `billing` command line (SPEC §7): `main` is the console script's entry point, `app` the
Typer application it runs (tests invoke `app` in process)."""

from starter.cli.app import app, main

__all__ = ["app", "main"]
