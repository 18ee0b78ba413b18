"""Duty-cycle throttle for kcopyd I/O (the kernel's ``dm_kcopyd_throttle``).

The kernel keeps two decaying clocks: ``io_period``, time during which at
least one job was doing I/O, and ``total_period``, all time.  Before a job
issues I/O (``io_job_start``) it compares ``io_period`` with ``percent`` of
``total_period``; while I/O used more than its share it sleeps 100 ms, at
most 10 times per job (more would risk a livelock between clients, says the
kernel comment).  Both clocks are halved once ``total_period`` reaches about
one second, so the throttle reacts to the recent past only.

Time comes from `trio.current_time`, so tests can drive it with
`trio.testing.MockClock`.
"""

from __future__ import annotations

import logging

import trio

__all__ = ["Throttle"]

log = logging.getLogger(__name__)

#: Sleep per throttling step (kernel SLEEP_USEC = 100 ms).
SLEEP = 0.1
#: Sleeps per job at most (kernel MAX_SLEEPS).
MAX_SLEEPS = 10
#: Both periods are halved once total_period reaches this (kernel
#: ``1 << ACCOUNT_INTERVAL_SHIFT`` jiffies, about one second).
ACCOUNT_INTERVAL = 1.0


class Throttle:
    """Limits the share of time kcopyd spends doing I/O to ``percent`` %.

    Every `io_job_start` must be paired with exactly one `io_job_finish`.

    Invariants: ``0 <= io_period <= total_period < ACCOUNT_INTERVAL`` after
    each accounting step; ``io_jobs`` is the number of started, unfinished
    jobs.  At 100 % nothing is accounted and `io_job_start` never sleeps
    (nor checkpoints), as in the kernel's ``likely(throttle >= 100)`` path.

    Args:
      percent: share of time I/O may use, 1..100.

    Raises:
      ValueError: if ``percent`` is outside 1..100.
    """

    def __init__(self, percent: int = 100):
        self._percent = _check_percent(percent)
        self.io_period = 0.0
        self.total_period = 0.0
        self.io_jobs = 0
        #: Total sleeps so far, for status and tests.
        self.sleeps = 0
        self._last: float | None = None

    @property
    def percent(self) -> int:
        """Share of time kcopyd I/O may use, 1..100 (settable at runtime)."""
        return self._percent

    @percent.setter
    def percent(self, value: int) -> None:
        value = _check_percent(value)
        if value != self._percent:
            # Nothing was accounted while at 100 %, and old history measured
            # against another share would only distort the first decisions:
            # start over (the kernel instead keeps a stale last_jiffies).
            self.io_period = self.total_period = 0.0
            self._last = None
        self._percent = value

    def _account(self) -> None:
        """Advance both periods up to now (the shared part of start/finish)."""
        now = trio.current_time()
        last = now if self._last is None else self._last
        self._last = now
        difference = max(0.0, now - last)
        if self.io_jobs:
            self.io_period += difference
        self.total_period += difference
        if self.io_period > self.total_period:
            self.io_period = self.total_period

    async def io_job_start(self) -> None:
        """Call before a job (or sub-job) issues I/O; may sleep to throttle.

        Sleeps `SLEEP` seconds at a time, at most `MAX_SLEEPS` times, while
        I/O has used more than ``percent`` % of the recent time.  Returns
        without a checkpoint at 100 %.
        """
        slept = 0
        while self._percent < 100:
            self._account()
            if self.total_period >= ACCOUNT_INTERVAL:
                # Kernel: shift = fls(total_period >> SHIFT); both >>= shift,
                # i.e. halve until total_period is below one interval again.
                shift = int(self.total_period / ACCOUNT_INTERVAL).bit_length()
                self.total_period /= 1 << shift
                self.io_period /= 1 << shift
            skew = self.io_period - self._percent * self.total_period / 100
            if skew <= 0 or slept >= MAX_SLEEPS:
                break
            slept += 1
            self.sleeps += 1
            await trio.sleep(SLEEP)
        if slept:
            log.debug("throttled a job for %d x %.0f ms", slept, SLEEP * 1000)
        self.io_jobs += 1

    def io_job_finish(self) -> None:
        """Call when the I/O started by `io_job_start` is done (never sleeps)."""
        self.io_jobs -= 1
        if self._percent >= 100:
            return
        if not self.io_jobs:
            # The busy interval ends here; io_jobs is already 0, so account
            # the tail of it as I/O time by hand, like the kernel does.
            now = trio.current_time()
            last = now if self._last is None else self._last
            self._last = now
            difference = max(0.0, now - last)
            self.io_period += difference
            self.total_period += difference
            if self.io_period > self.total_period:
                self.io_period = self.total_period


def _check_percent(percent: int) -> int:
    if isinstance(percent, bool) or not isinstance(percent, int):
        raise ValueError(f"throttle percent must be an int, not {percent!r}")
    if not 1 <= percent <= 100:
        raise ValueError(f"throttle percent must be 1..100, not {percent}")
    return percent
