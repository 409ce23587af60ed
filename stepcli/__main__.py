"""Entry point for ``python -m stepcli``."""

from stepcli.cli import main

main()
