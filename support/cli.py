"""One error convention for every script.

A problem the user can fix is one line on stderr, `error: <what is wrong and what to do>`, and an exit
status: 2 for a command line, input or directory refused before any work (UsageError), 1 for a failure
met while working (a data file, a model, an adapter, a run that stopped), 130 for Ctrl-C. Never a
traceback for these.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """A command line, input file or directory we refuse before doing any work."""


def run_cli(
    work: Callable[[], object],
    failures: tuple[type[BaseException], ...] = (),
    interrupted: str | None = None,
) -> int:
    """Run `work()` and turn the errors a user can meet into one line on stderr and an exit status."""
    try:
        work()
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except failures as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        if interrupted:
            print(f"\ninterrupted: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK
