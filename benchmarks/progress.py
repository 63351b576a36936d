"""A progress bar for a run that takes minutes: tqdm when installed, a plain line otherwise."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any


class Progress:
    """One bar over all the planned work (in units of about one fork-mode execution, so the
    ETA holds); `phase` names what is running now."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total = total
        self.enabled = enabled
        self.done = 0
        self._bar: Any = None
        self._phase = ""
        self._last_line = 0.0
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                self._bar = None
            else:
                self._bar = tqdm(total=total, unit=" work", file=sys.stderr, dynamic_ncols=True,
                                 mininterval=0.25, smoothing=0.05)

    def phase(self, name: str) -> None:
        self._phase = name
        if self._bar is not None:
            self._bar.set_description_str(name, refresh=True)
        elif self.enabled:
            self._line(force=True)

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        elif self.enabled:
            self._line()

    def _line(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_line > 2.0:
            self._last_line = now
            percent = 100.0 * self.done / self.total if self.total else 100.0
            print(f"[{percent:5.1f}%] {self._phase}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
