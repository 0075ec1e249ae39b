"""One error convention for every script.

A problem the user can fix is one line on stderr, `error: <what is wrong and what to do>`, and an exit
status: 2 for a command line, data file, model, adapter directory or output directory refused before any
work (UsageError and the refusals each script names), 1 for a failure met while working (an adapter that
does not fit the model, a damaged checkpoint, a lost rank, a full disk), 130 for Ctrl-C. Never a traceback
for these. A warning is one line too, `warning: <what and what to do>`. A reader of the output that goes
away (`infer.py --json ... | head -1`) ends the command quietly with 141, the status of `cat` killed by
SIGPIPE.
"""

from __future__ import annotations

import errno
import faulthandler
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


# Errors of the file system a user can fix: a full disk, a quota, a file-size limit (ulimit -f), a read-only
# place, missing permissions.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


class UsageError(ValueError):
    """A command line, input file or directory we refuse before doing any work."""


def run_cli(
    work: Callable[[], object],
    failures: tuple[type[BaseException], ...] = (),
    interrupted: str | None = None,
    after_write_failure: str = "",
    refusals: tuple[type[BaseException], ...] = (),
) -> int:
    """Run `work()` and turn the errors a user can meet into one line on stderr and an exit status: 2 for a
    UsageError and the `refusals` (errors of layers below this one that refuse an input before any work, such
    as data.DataError), 1 for the `failures`; `after_write_failure` ends the sentence for a full disk or
    missing permissions (how to go on)."""
    try:
        with warnings.catch_warnings():  # restored on return: the format holds for this command's work only
            warnings.showwarning = one_line_warning
            work()
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit, where Python would print it
    except BrokenPipeError:
        return reader_gone()
    except (UsageError, *refusals) as err:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank refuses alike: rank 0 says it
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
            f"permissions and run again{after_write_failure}.",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except KeyboardInterrupt as err:
        if str(err) or interrupted:
            print(f"\ninterrupted: {str(err) or interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


def reader_gone() -> int:
    """After a BrokenPipeError on stdout: what is left goes nowhere (Python would flush stdout once more at exit
    and fail again), and the command ends as `cat` does when its reader leaves."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as the user reads it, `warning: <message>`, without the file and line of the code that warned."""
    print(f"warning: {message}", file=file or sys.stderr)


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM raises KeyboardInterrupt, as Ctrl-C does: run_cli then says the program was
    stopped and exits 130, where SIGTERM's default would end it at once, without a word (status 143)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


STOP_GRACE_S = 120  # after a stop request, how long the run may take to finish its step and save


@contextmanager
def stop_requests(grace_s: float = STOP_GRACE_S) -> Iterator[list[str]]:
    """Inside the block, SIGINT (Ctrl-C) and SIGTERM are noted, not obeyed at once: the list yielded
    receives the signal's name, so a loop can finish its step and save before it stops.

    A second signal acts at once. So does the end of a deadline: Python runs a signal handler only
    between bytecodes, never while a collective or a kernel is stuck in C++, so the signal also wakes a
    thread (through the wakeup fd, written by the C-level handler) that arms faulthandler's watchdog,
    which needs no GIL: if the process has not ended `grace_s` later, it prints every thread's stack and
    exits with status 1."""
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
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    previous_wakeup = signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)

    def arm_deadline():
        while signum := os.read(wake_read, 1):  # b"" once the block has ended
            if signum[0] in (signal.SIGINT, signal.SIGTERM):
                faulthandler.dump_traceback_later(grace_s, exit=True)
                print(
                    f"\n{signal.Signals(signum[0]).name}: finishing the step and saving a checkpoint; past "
                    f"{grace_s:.0f} s the run ends anyway (a second signal ends it now).",
                    file=sys.stderr,
                    flush=True,
                )
                return

    watchdog = threading.Thread(target=arm_deadline, name="stop-deadline", daemon=True)
    watchdog.start()
    try:
        yield received
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        os.close(wake_write)
        watchdog.join()
        os.close(wake_read)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
