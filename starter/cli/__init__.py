"""The `billing` command line (SPEC §7): `app` is the console script's entry point."""

from starter.cli.app import app

__all__ = ["app"]
