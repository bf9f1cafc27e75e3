"""Graceful stop on SIGTERM / SIGINT: the training loop saves a checkpoint and exits cleanly.

Schedulers (Slurm, Kubernetes, TPU/GPU preemption) send SIGTERM and give the job a grace period;
a user presses Ctrl-C (SIGINT). Both only set a flag here, because a checkpoint written from
inside a signal handler could interrupt a half-finished step. The loop polls `should_stop(step)`
once per step. A second Ctrl-C raises KeyboardInterrupt as usual, to force-quit a stuck job.

Multi-host: one host stopping alone would hang the others in the next collective, so the hosts
must agree on the step to stop at. JAX's preemption service does that (it catches SIGTERM itself
and picks a common step, `multihost_utils.reached_preemption_sync_point`); when it is running
the guard leaves SIGTERM to it and `should_stop` asks it as well.
"""

from __future__ import annotations

import logging
import signal
import threading
import warnings

import jax

log = logging.getLogger(__name__)


def _preemption_service_running() -> bool:
    if jax.process_count() == 1:
        return False
    try:
        from jax._src import distributed

        return distributed.global_state.preemption_sync_manager is not None
    except Exception:  # private API moved: assume absent, SIGTERM is then handled here
        return False


class PreemptionGuard:
    """Context manager that turns SIGTERM/SIGINT into a flag polled by the training loop."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self._signals = tuple(signals)
        self._previous: dict[int, object] = {}
        self._requested = False
        self.signal_name: str | None = None
        self._multihost = False

    @property
    def requested(self) -> bool:
        """True once a stop signal arrived in this process."""
        return self._requested

    def _handle(self, signum, frame) -> None:
        if self._requested and signum == signal.SIGINT:
            # Second Ctrl-C: the user wants out now.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if not self._requested:
            self._requested = True
            self.signal_name = signal.Signals(signum).name
            log.warning(
                "%s received: saving a checkpoint and stopping after this step "
                "(press Ctrl-C again to quit immediately)",
                self.signal_name,
            )

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            warnings.warn(
                "PreemptionGuard: signal handlers can only be installed from the main thread; "
                "SIGTERM/SIGINT keep their default behaviour",
                RuntimeWarning,
                stacklevel=2,
            )
            return self
        self._requested, self.signal_name = False, None
        self._multihost = jax.process_count() > 1
        service = _preemption_service_running()
        for sig in self._signals:
            if sig == signal.SIGTERM and service:
                continue  # jax's preemption notifier owns SIGTERM and syncs the hosts
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def should_stop(self, step: int) -> bool:
        """True when the loop should save and stop after `step`.

        Single process: the signal flag. Multi-process: also JAX's preemption sync point, which
        is true on all hosts at the same step (call it at every step, on every host).
        """
        if self._requested:
            return True
        if self._multihost:
            try:
                from jax.experimental import multihost_utils

                if multihost_utils.reached_preemption_sync_point(int(step)):
                    self.signal_name = self.signal_name or "preemption sync point"
                    return True
            except RuntimeError:  # preemption service disabled
                return False
        return False
