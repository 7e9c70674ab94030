"""Ctrl-C and SIGTERM, handled the same orderly way by the platform, training and batch scoring.

The handler raises KeyboardInterrupt, but Python can lose that exception: a signal that arrives
while a finaliser (`__del__`, a weakref callback) or a library's catch-all runs is printed as
"Exception ignored" and the code carries on. So the handler also sets `INTERRUPTED`, and long
work calls `check` between its stages: a run that was told to stop never goes on to register
or promote a model.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

INTERRUPTED = threading.Event()
"""Set once a stop signal arrived (errors that follow it are the interruption's, not bugs)."""


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM both raise KeyboardInterrupt (and set `INTERRUPTED`).

    Installed explicitly: a process started in the background by a shell inherits SIGINT as
    ignored, and SIGTERM's default would end the process without any clean-up.
    """

    def interrupt(signum, frame):
        INTERRUPTED.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def check() -> None:
    """Raise KeyboardInterrupt if a stop signal arrived, whatever became of the one its
    handler raised."""
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def orderly_stop(message: str) -> Iterator[None]:
    """A command's body, stopped in order by Ctrl-C or SIGTERM: `message` on stderr and exit
    code 130, also when what broke broke because of the signal (an error raised after it)."""
    stop_on_signals()
    try:
        yield
    except BaseException as exc:
        if INTERRUPTED.is_set() or isinstance(exc, KeyboardInterrupt):
            print(message, file=sys.stderr)
            sys.exit(130)
        raise
