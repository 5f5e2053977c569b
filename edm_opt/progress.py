"""Progress on the console: a live tqdm bar on a terminal; plain lines at a fixed interval otherwise (a log file,
a pipe, a sweep cell's log), never carriage-return floods.

    with progress(total=n, desc="J* (cdol)", unit="block") as bar:
        bar.update(1)
"""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

LINE_INTERVAL_S = float(os.environ.get("EDM_OPT_PROGRESS_INTERVAL", 30))  # between plain lines off a terminal


def progress(iterable=None, total: float | None = None, desc: str = "", unit: str = "it", disable: bool = False,
             file=None, initial: float = 0, **kwargs):
    """A tqdm bar when `file` (default stderr) is a terminal, else a `Lines` reporter with the same interface
    (update, set_postfix, set_postfix_str, write, close, n, iteration, context manager); `kwargs` go to tqdm."""
    file = file or sys.stderr
    if disable or (hasattr(file, "isatty") and file.isatty()):
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=file, initial=initial, **kwargs)
    return Lines(iterable, total, desc, unit, file, initial)


class Lines:
    """Progress as one plain line every LINE_INTERVAL_S seconds and one at the end:
    `desc: 1234/5000 unit (25%), 41.2 unit/s, eta 1.5 min[, postfix]`."""

    def __init__(self, iterable=None, total: float | None = None, desc: str = "", unit: str = "it", file=None,
                 initial: float = 0):
        self.iterable, self.desc, self.unit, self.file = iterable, desc, unit, file or sys.stderr
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.initial, self.postfix = initial, initial, ""
        self.t0 = self.last = time.monotonic()
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= LINE_INTERVAL_S:
            self._line()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k} {v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def write(self, line: str) -> None:
        print(line, file=self.file, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n > self.initial:
                self._line()

    def _line(self) -> None:
        self.last = time.monotonic()
        elapsed = max(self.last - self.t0, 1e-9)
        rate = (self.n - self.initial) / elapsed
        parts = [f"{self.desc}: {self.n:g}" + (f"/{self.total:g}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"eta {(self.total - self.n) / rate / 60:.1f} min")
        if self.postfix:
            parts.append(self.postfix)
        print(", ".join(parts), file=self.file, flush=True)
