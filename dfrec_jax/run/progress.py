"""Console progress: one plain line every N steps with the metrics, speed and ETA.

    step 120/300 (40%) | total 1.234 | 3.1 s/step 2.58 img/s | ETA 9m18s | elapsed 6m12s

One line per report (no carriage returns or bars) so logs stay readable when redirected to a
file. Speed is a moving average of wall-clock time between `update` calls over the last
`window` steps; the first interval after start is left out (it includes compilation) unless it
is all there is. Times are only meaningful if the caller syncs with the device now and then
(reading the metrics does), which the training loop does at every report.
"""

from __future__ import annotations

import collections
import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

import jax


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{seconds:02d}s"
    if minutes:
        return f"{minutes}m{seconds:02d}s"
    return f"{seconds}s"


def _format_value(value) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


class Progress:
    """Prints a progress line every `every` steps and at `total_steps`.

    `update(step, ...)` is called with the number of steps done so far (any call pattern:
    every step, or only every `every` steps). `enabled`: None = only process 0 prints.
    `clock`: seconds as a float (tests inject a fake one).
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        *,
        every: int = 10,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        clock: Callable[[], float] = time.perf_counter,
        window: int = 50,
    ):
        self.total_steps = int(total_steps)
        self.every = max(1, int(every))
        self.stream = stream
        self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
        self.clock = clock
        self.window = max(int(window), self.every)
        self._start_time = self._last_time = clock()
        self._last_step = int(start_step)
        self._first: tuple[float, int] | None = None  # (seconds, steps) of the first interval
        self._intervals: collections.deque[tuple[float, int]] = collections.deque()
        self._window_steps = 0

    @property
    def seconds_per_step(self) -> float | None:
        """Moving-average step time (None before any step was timed)."""
        if self._intervals:
            return sum(t for t, _ in self._intervals) / self._window_steps
        if self._first is not None:
            return self._first[0] / self._first[1]
        return None

    def _record(self, step: int) -> None:
        now, steps = self.clock(), step - self._last_step
        if steps <= 0:
            return
        interval = (now - self._last_time, steps)
        self._last_time, self._last_step = now, step
        if self._first is None:
            self._first = interval
            return
        self._intervals.append(interval)
        self._window_steps += steps
        while (
            len(self._intervals) > 1 and self._window_steps - self._intervals[0][1] >= self.window
        ):
            self._window_steps -= self._intervals.popleft()[1]

    def update(
        self,
        step: int,
        metrics: Mapping[str, float] | None = None,
        images_per_step: int | None = None,
    ) -> str | None:
        """Records that `step` steps are done; every `every` steps (and at the last) prints and
        returns the progress line, otherwise returns None."""
        step = int(step)
        self._record(step)
        if not self.enabled or (step % self.every and step != self.total_steps):
            return None
        parts = [f"step {step}/{self.total_steps} ({100 * step / max(self.total_steps, 1):.0f}%)"]
        if metrics:
            parts.append(" ".join(f"{k} {_format_value(v)}" for k, v in metrics.items()))
        per_step = self.seconds_per_step
        if per_step is not None and per_step > 0:
            speed = f"{per_step:.3g} s/step"
            if images_per_step:
                speed += f" {images_per_step / per_step:.3g} img/s"
            parts.append(speed)
            parts.append(f"ETA {format_duration(per_step * max(self.total_steps - step, 0))}")
        else:
            parts.append("ETA ?")
        parts.append(f"elapsed {format_duration(self.clock() - self._start_time)}")
        line = " | ".join(parts)
        print(line, file=self.stream if self.stream is not None else sys.stderr, flush=True)
        return line
