"""Progress of long work that a user can read in a terminal and in a log file alike.

``tqdm`` redraws one line with carriage returns: right on a terminal, unreadable in a
``ray job logs`` stream or a CI log (one endless line, or nothing when tqdm disables
itself off a terminal). :func:`progress` gives a tqdm bar on a terminal and otherwise
plain lines -- ``teacher: pretrain shapes-tiny 120/600 (20%) loss=2.31 3.9 it/s ETA 2m03s``
-- at most every ``every_s`` seconds, plus the first and the last.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Iterable, Iterator, TextIO

from tqdm import tqdm

LINE_EVERY_S = 15.0


class LineProgress:
    """The tqdm subset the platform uses (``update``, ``set_postfix``, ``close``, iteration), as lines."""

    def __init__(self, iterable: Iterable[Any] | None, total: int | None, desc: str, unit: str,
                 every_s: float, file: TextIO) -> None:
        self.iterable, self.desc, self.unit, self.every_s, self.file = iterable, desc, unit, every_s, file
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)  # type: ignore[arg-type]
        self.n = 0
        self.postfix = ""
        self.start = self.last = time.perf_counter()
        self._emit()

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self._emit()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.file is not None:
            self._emit(final=True)
            self.file = None  # type: ignore[assignment]

    def _emit(self, final: bool = False) -> None:
        if self.file is None:
            return
        elapsed = time.perf_counter() - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        parts = [self.desc, f"{self.n}/{self.total}" if self.total else str(self.n)]
        if self.total:
            parts.append(f"({100 * self.n / self.total:.0f}%)")
        if self.postfix:
            parts.append(self.postfix)
        if self.n:
            parts.append(f"{rate:.1f} {self.unit}/s")
        if final:
            parts.append(f"done in {format_seconds(elapsed)}")
        elif self.total and rate > 0:
            parts.append(f"ETA {format_seconds((self.total - self.n) / rate)}")
        print(" ".join(parts), file=self.file, flush=True)


def format_seconds(seconds: float) -> str:
    """``125.3`` -> ``2m05s``; ``9.2`` -> ``9s``."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress(iterable: Iterable[Any] | None = None, total: int | None = None, desc: str = "", unit: str = "it",
             every_s: float = LINE_EVERY_S, file: TextIO | None = None) -> Any:
    """A tqdm bar on a terminal, :class:`LineProgress` lines elsewhere (same calls on both)."""
    file = file or sys.stderr
    if file.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=file, leave=False)
    return LineProgress(iterable, total, desc, unit, every_s, file)
