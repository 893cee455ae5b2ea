"""A dependency-free progress bar on stderr (a redrawn line on a terminal, sparse lines otherwise)."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    """``bar = ProgressBar(total, label); bar.update(n); bar.close()``; shows count, rate and ETA."""

    def __init__(self, total: int, label: str = "", enabled: bool = True, stream=None, width: int = 30):
        self.total, self.label, self.enabled, self.width = max(total, 0), label, enabled, width
        self.stream = stream or sys.stderr
        self.done = 0
        self._start = time.perf_counter()
        self._first = None  # count when timing started (resumed work does not count towards the rate)
        self._last_draw = 0.0
        self._interactive = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, count: int = 1) -> None:
        self.done = min(self.total, self.done + count)
        if self._first is None:
            self._first, self._start = self.done, time.perf_counter()
        now = time.perf_counter()
        # a terminal is redrawn 5 times a second; a log file gets a line every 10 % only
        interval_passed = now - self._last_draw >= 0.2 if self._interactive else \
            self.total and self.done * 10 // self.total != (self.done - count) * 10 // self.total
        if self.enabled and (interval_passed or self.done == self.total):
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = now - self._start
        fraction = self.done / self.total if self.total else 1.0
        filled = int(self.width * fraction)
        rate = (self.done - self._first) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        line = (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{rate:.1f}/s, {elapsed:.0f} s elapsed, {eta:.0f} s left")
        self.stream.write(("\r" + line) if self._interactive else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._interactive:
            self.stream.write("\n")
            self.stream.flush()
