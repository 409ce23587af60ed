"""The ``stepcli`` console script: import the CLI, then run it.

Importing the CLI loads torch and takes a few seconds. A Ctrl-C in that time would print a
traceback from inside the import, so this module, which imports nothing heavy, catches it.
"""

import sys


def main() -> None:
    try:
        from stepcli.cli import main as run_cli
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted while starting; nothing was stored\n")
        sys.exit(130)
    run_cli()
