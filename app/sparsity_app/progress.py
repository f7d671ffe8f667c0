"""A dependency-free progress bar for the command line (redraws on a TTY, logs lines otherwise)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressBar"]


class ProgressBar:
    """Counts steps toward ``total`` and shows rate and ETA on ``stream`` (stderr by default)."""

    def __init__(
        self, total: int, *, desc: str = "", stream: TextIO | None = None, width: int = 28
    ):
        self.total = max(int(total), 1)
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.count = 0
        self.postfix = ""
        self._start = time.perf_counter()
        self._last_draw = 0.0
        self._last_logged_decile = -1
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, n: int = 1, *, postfix: str | None = None) -> None:
        """Advance by ``n`` steps (redraws at most 10 times a second)."""
        self.count = min(self.count + n, self.total)
        if postfix is not None:
            self.postfix = postfix
        now = time.perf_counter()
        if self._tty:
            if now - self._last_draw >= 0.1 or self.count == self.total:
                self._last_draw = now
                self.stream.write("\r" + self._line(now))
                self.stream.flush()
        else:
            decile = 10 * self.count // self.total
            if decile != self._last_logged_decile:
                self._last_logged_decile = decile
                self.stream.write(self._line(now) + "\n")
                self.stream.flush()

    def close(self) -> None:
        """Finish the bar's line."""
        if self._tty:
            self.stream.write("\r" + self._line(time.perf_counter()) + "\n")
            self.stream.flush()

    def _line(self, now: float) -> str:
        frac = self.count / self.total
        filled = int(self.width * frac)
        elapsed = now - self._start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.count) / rate if rate > 0 else float("nan")
        bar = "#" * filled + "-" * (self.width - filled)
        text = f"{self.desc} [{bar}] {self.count}/{self.total} {frac:4.0%} {elapsed:5.1f}s"
        if eta == eta:  # not NaN
            text += f" eta {eta:4.1f}s"
        if self.postfix:
            text += f" {self.postfix}"
        return text
