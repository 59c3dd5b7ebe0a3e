"""`python -m pink.cli`: the `pink` command without an installed entry point
(used by tests and from a source checkout)."""

from pink.cli import main

main(prog_name="pink")
