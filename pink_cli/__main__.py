"""`python -m pink_cli`: the `pink` command without an installed entry point
(used by tests and from a source checkout)."""

from pink_cli import main

main(prog_name="pink")
