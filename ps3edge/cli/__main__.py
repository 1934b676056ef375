"""`python -m ps3edge.cli`: the console script."""

from .app import main

main()
