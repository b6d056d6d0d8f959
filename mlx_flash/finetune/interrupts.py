"""Ctrl-C (SIGINT) and SIGTERM: stop a run without losing or tearing anything.

Outside the training loop both signals raise: ``KeyboardInterrupt`` for
SIGINT, as Python does, and ``Terminated`` (a ``KeyboardInterrupt``) for
SIGTERM, so one ``except KeyboardInterrupt`` handles both and the command
exits 130 or 143, the status a shell gives a process those signals kill.

Inside the training loop (``deferred``) the first signal only asks the loop
to stop once the iteration in progress is done, so that the checkpoint it
writes then holds whole iterations; a second signal raises at once and
leaves the last checkpoint on disk as it was.

Handlers can only be set from the main thread; elsewhere (a run started from
a worker thread) the signals keep whatever handling they had.
"""

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Optional

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; raised where Ctrl-C would raise ``KeyboardInterrupt``."""


def signal_of(error: BaseException) -> int:
    """The signal behind a ``KeyboardInterrupt``: SIGTERM for ``Terminated``, else SIGINT."""
    return signal.SIGTERM if isinstance(error, Terminated) else signal.SIGINT


def _raise(signum, frame):
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextmanager
def _handlers(handler):
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in EXIT_STATUS}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


@contextmanager
def raising():
    """While the block runs, SIGINT and SIGTERM raise (see the module doc)."""
    with _handlers(_raise):
        yield


class StopRequest:
    """Set by the first signal inside ``deferred``: ``signal`` is its number."""

    def __init__(self):
        self.signal: Optional[int] = None

    def __bool__(self) -> bool:
        return self.signal is not None


@contextmanager
def deferred(notice: Optional[Callable[[int], None]] = None):
    """Yield a ``StopRequest`` that the first SIGINT or SIGTERM sets (calling
    ``notice(signum)``); the second raises as ``raising`` does."""
    request = StopRequest()

    def handler(signum, frame):
        if request:
            _raise(signum, frame)
        request.signal = signum
        if notice is not None:
            notice(signum)

    with _handlers(handler):
        yield request


def announce(signum: int, what: str, stream=None) -> None:
    """One line saying that ``signum`` arrived and what happens now."""
    stream = stream or sys.stderr
    stream.write(f"\nmlx_flash.finetune: {NAMES.get(signum, signum)}: {what}\n")
    stream.flush()
