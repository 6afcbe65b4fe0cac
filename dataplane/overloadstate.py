"""The state of `--overload-memory` (pure: no I/O, no clock): the threshold, the last
sample, and whether the process is over it. Apart from `overload`, which samples and
tells the listeners, so the runtime can hold it without importing the sampler."""

from __future__ import annotations


class MemoryOverload:
    """The threshold, the last sample, and whether the process is over it."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.resident = 0
        self.active = False
        self.episodes = 0  # times the process went over

    def update(self, resident: int) -> bool:
        """Take a sample; True when it changed the state (pure: no I/O, no clock)."""
        self.resident = resident
        over = resident > self.threshold
        if over == self.active:
            return False
        self.active = over
        if over:
            self.episodes += 1
        return True
