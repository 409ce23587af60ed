"""The ``stepcli`` console script: import the CLI, then run it.

Importing the CLI loads torch and takes a few seconds. A Ctrl-C in that time would print a
traceback from inside the import, so this module, which imports nothing heavy, catches it.
"""

import signal
import sys


def main() -> None:
    try:
        from stepcli.cli import main as run_cli
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted while starting; nothing was stored\n")
        sys.exit(130)
    try:
        run_cli()
    except SystemExit as exc:
        if exc.code == 130:
            # Everything is stored by now. Ignoring further signals keeps a repeated Ctrl-C
            # from raising inside the interpreter's exit hooks (torch registers some). This
            # runs only in the stepcli process itself, never in a caller of cli.main.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise
