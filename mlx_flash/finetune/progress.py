"""A plain-text progress bar on stderr: iteration, loss, it/s.

On a terminal the bar redraws in place; otherwise (a log file, CI) it prints
one line per report interval, and one per iteration when iterations are
long (``QUIET_S``), so logs stay readable and never go quiet for long.
"""

import sys
import time
from typing import Optional, TextIO

#: Longest a long phase (loading, tokenizing, training, generating) stays
#: silent, in seconds, where it can say how far it got.
QUIET_S = 10.0


class Progress:
    def __init__(
        self,
        total: int,
        label: str,
        every: int = 10,
        stream: Optional[TextIO] = None,
        enabled: bool = True,
        width: int = 24,
        first: int = 1,
    ):
        self.total = total
        self.label = label
        self.every = max(1, every)
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.width = width
        self.interactive = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.first = first
        # it/s counts from here: make the bar just before the first iteration.
        self.start = time.perf_counter()
        self.paused_at: Optional[float] = None
        self.last_line = self.start
        self.open_line = False

    def pause(self) -> None:
        """Stop the it/s clock while other work runs (another run's turn)."""
        if self.paused_at is None:
            self.paused_at = time.perf_counter()

    def resume(self) -> None:
        if self.paused_at is not None:
            self.start += time.perf_counter() - self.paused_at
            self.paused_at = None

    def line(self, iteration: int, loss: float, it_per_s: float, val_loss: Optional[float] = None) -> str:
        filled = int(self.width * iteration / max(self.total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        text = f"[{self.label}] {iteration:>{len(str(self.total))}}/{self.total} |{bar}| loss {loss:.3f}"
        if val_loss is not None:
            text += f" | val {val_loss:.3f}"
        return text + f" | {it_per_s:.2f} it/s"

    def update(self, iteration: int, loss: float, val_loss: Optional[float] = None) -> None:
        """Show progress after ``iteration``; it/s counts from ``first``."""
        if not self.enabled:
            return
        done = iteration - self.first + 1
        it_per_s = done / max(time.perf_counter() - self.start, 1e-9)
        text = self.line(iteration, loss, it_per_s, val_loss)
        now = time.perf_counter()
        if self.interactive:
            self.stream.write("\r\033[K" + text)
            self.open_line = True
        elif (
            iteration % self.every == 0
            or iteration == self.total
            or val_loss is not None
            or now - self.last_line >= QUIET_S  # long iterations: a line for each
        ):
            self.stream.write(text + "\n")
            self.last_line = now
        self.stream.flush()

    def close(self) -> None:
        if self.open_line:
            self.stream.write("\n")
            self.stream.flush()
            self.open_line = False


def note(label: str, text: str, enabled: bool = True) -> None:
    """One progress line on stderr: ``[label] text``."""
    if enabled:
        sys.stderr.write(f"[{label}] {text}\n")
        sys.stderr.flush()


class Every:
    """``due()`` is true at most once per ``seconds``: progress lines inside a long loop."""

    def __init__(self, seconds: float = QUIET_S):
        self.seconds = seconds
        self.last = time.perf_counter()

    def due(self) -> bool:
        now = time.perf_counter()
        if now - self.last < self.seconds:
            return False
        self.last = now
        return True
