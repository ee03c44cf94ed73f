"""`python -m starter.cli`: the `billing` command line, for child processes of `billing dev`."""

from starter.cli import main

main()
