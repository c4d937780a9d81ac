"""Progress lines for long loops that have no progress bar (probes over specs, few-shot over episode sets)."""

from __future__ import annotations

import time
from typing import Callable


class Progress:
    """Progress lines for a long loop: done/total, elapsed and time left, at most every ``every_s`` seconds."""

    def __init__(self, say: Callable[[str], None], total: int, noun: str, every_s: float = 10.0):
        self.say, self.total, self.noun, self.every_s = say, total, noun, every_s
        self.done, self.t0 = 0, time.perf_counter()
        self.last = self.t0

    def step(self, what: str) -> None:
        self.done += 1
        now = time.perf_counter()
        if self.done < self.total and now - self.last >= self.every_s:
            left = (now - self.t0) / self.done * (self.total - self.done)
            self.say(f"  {self.done}/{self.total} {self.noun}s ({what}) after {now - self.t0:.0f}s, "
                     f"about {left:.0f}s left")
            self.last = now
