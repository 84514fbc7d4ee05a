"""Progress that suits where it is shown: a tqdm bar in a terminal, a few log lines elsewhere.

A bar redrawn with carriage returns floods a log file or CI output with kilobytes of
frames. When stderr is not a terminal, a stage instead logs one line when it starts and
one when it ends (with its duration), plus at most one line per ``log_every`` seconds.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger("moe_ao.progress")

__all__ = ["Progress", "progress"]


class Progress:
    """A stage of ``total`` steps; ``update(n)`` advances it, ``close()`` ends it.

    Args:
        total: the number of steps.
        desc: the stage's name.
        enabled: False shows nothing.
        log_every: seconds between intermediate lines when not in a terminal.
    """

    def __init__(self, total: int, desc: str, enabled: bool = True, log_every: float = 60.0) -> None:
        self.total, self.desc, self.done = total, desc, 0
        self.enabled, self.log_every = enabled, log_every
        self.bar = tqdm(total=total, desc=desc) if enabled and sys.stderr.isatty() else None
        self.start = self.last = time.perf_counter()
        if enabled and self.bar is None:
            logger.info("%s: %d steps", desc, total)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.perf_counter() - self.last >= self.log_every and self.done < self.total:
            self.last = time.perf_counter()
            logger.info("%s: %d/%d after %.0f s", self.desc, self.done, self.total, self.last - self.start)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            logger.info("%s: %d/%d done in %.1f s", self.desc, self.done, self.total, time.perf_counter() - self.start)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(items: Iterable, desc: str, enabled: bool = True, total: int | None = None) -> Iterator:
    """Iterates ``items``, showing progress as :class:`Progress` does."""
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    with Progress(total if total is not None else len(items), desc, enabled) as p:
        for item in items:
            yield item
            p.update()
