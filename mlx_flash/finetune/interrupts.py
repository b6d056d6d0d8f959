"""Ctrl-C (SIGINT) and SIGTERM: stop a run without losing or tearing anything.

Outside the training loop both signals raise: ``KeyboardInterrupt`` for
SIGINT, as Python does, and ``Terminated`` (a ``KeyboardInterrupt``) for
SIGTERM, so one ``except KeyboardInterrupt`` handles both and the command
exits 130 or 143, the status a shell gives a process those signals kill.

Inside the training loop (``deferred``) the first signal only asks the loop
to stop once the iteration in progress is done, so that the checkpoint it
writes then holds whole iterations, and says at once how long that may be;
a second signal stops at once, even inside a long step, and leaves the last
checkpoint on disk as it was.

Handlers can only be set from the main thread; elsewhere (a run started from
a worker thread) the signals keep whatever handling they had.
"""

import os
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
        self.raised = False  # the second signal raised in the main thread

    def __bool__(self) -> bool:
        return self.signal is not None


#: Seconds the main thread has to act on a second signal before the process
#: ends without it (it is inside a long computation that Python cannot stop).
GRACE_S = 1.0


@contextmanager
def deferred(notice: Optional[Callable[[int], None]] = None, at_once: Optional[Callable[[int], str]] = None):
    """Yield a ``StopRequest`` that the first SIGINT or SIGTERM sets; the
    second raises as ``raising`` does.

    Python runs signal handlers only between bytecodes, so a handler waits
    for a long MLX computation (one training step can take minutes) to
    return. The signals are therefore also watched from a thread, which
    calls ``notice(signum)`` the moment the first arrives; if the main thread
    has not acted on a second one within ``GRACE_S``, the thread prints
    ``at_once(signum)`` and ends the process with the signal's exit status,
    leaving the last checkpoint as it was (checkpoints are written whole or
    not at all).
    """
    request = StopRequest()

    def handler(signum, frame):
        if request:
            request.raised = True
            _raise(signum, frame)
        request.signal = signum

    with _handlers(handler), _watching(request, notice, at_once):
        yield request


@contextmanager
def _watching(request: StopRequest, notice, at_once):
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    read, write = os.pipe()
    os.set_blocking(write, False)
    try:
        previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    except (ValueError, OSError):  # no wakeup fd on this platform or thread
        os.close(read)
        os.close(write)
        yield
        return
    closing = threading.Event()

    def watch():
        seen = 0
        while True:
            data = os.read(read, 64)
            for signum in data:
                if signum not in EXIT_STATUS:
                    continue  # another signal (or the wake-up byte at the end)
                seen += 1
                if seen == 1 and notice is not None:
                    notice(signum)
                elif seen == 2 and not closing.is_set():
                    closing.wait(GRACE_S)
                    if not closing.is_set() and not request.raised:
                        stream = sys.stderr
                        stream.write(f"\nmlx_flash.finetune: {at_once(signum) if at_once else NAMES[signum] + ': stopped at once'}\n")
                        stream.flush()
                        sys.stdout.flush()
                        os._exit(EXIT_STATUS[signum])
            if closing.is_set() or not data:
                return

    thread = threading.Thread(target=watch, name="mlx_flash-signals", daemon=True)
    thread.start()
    try:
        yield
    finally:
        closing.set()
        signal.set_wakeup_fd(previous)
        os.write(write, b"\0")  # wake the thread: it reports what arrived, then ends
        thread.join()
        os.close(read)
        os.close(write)


def announce(signum: int, what: str, stream=None) -> None:
    """One line saying that ``signum`` arrived and what happens now."""
    stream = stream or sys.stderr
    stream.write(f"\nmlx_flash.finetune: {NAMES.get(signum, signum)}: {what}\n")
    stream.flush()
