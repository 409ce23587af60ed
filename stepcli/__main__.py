"""Entry point for ``python -m stepcli``."""

from stepcli.entry import main

main()
