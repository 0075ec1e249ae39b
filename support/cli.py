"""One error convention for every script.

A problem the user can fix is one line on stderr, `error: <what is wrong and what to do>`, and an exit
status: 2 for a command line, input or directory refused before any work (UsageError), 1 for a failure
met while working (a data file, a model, an adapter, a run that stopped), 130 for Ctrl-C. Never a
traceback for these.
"""

from __future__ import annotations

import errno
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


# Errors of the file system a user can fix: a full disk, a quota, a read-only place, missing permissions.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


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
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        print(
            f"error: could not write {err.filename or 'a file'} ({err.strerror}); free some space or fix the "
            "permissions and run again (a training run continues from its last checkpoint with --resume).",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except KeyboardInterrupt as err:
        if str(err) or interrupted:
            print(f"\ninterrupted: {str(err) or interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


@contextmanager
def stop_requests() -> Iterator[list[str]]:
    """Inside the block, SIGINT (Ctrl-C) and SIGTERM are noted, not obeyed at once: the list yielded
    receives the signal's name, so a loop can finish its step and save before it stops. A second
    signal acts at once."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread may handle signals
        yield received
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def note(signum, frame):
        received.append(signal.Signals(signum).name)
        signal.signal(signum, previous[signum])

    for sig in previous:
        signal.signal(sig, note)
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
