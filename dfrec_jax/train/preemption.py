"""Graceful stop on SIGTERM / SIGINT: the training loop saves a checkpoint and exits cleanly.

Schedulers (Slurm, Kubernetes, TPU/GPU preemption) send SIGTERM and give the job a grace period;
a user presses Ctrl-C (SIGINT). Both only set a flag here, because a checkpoint written from
inside a signal handler could interrupt a half-finished step. The loop polls `should_stop(step)`
once per step. A second Ctrl-C raises KeyboardInterrupt as usual, to force-quit a stuck job.

Multi-host: one host stopping alone would hang the others in the next collective, so the hosts
must agree on the step to stop at. JAX's preemption service does that for SIGTERM (it catches it
itself and picks a common step, `multihost_utils.reached_preemption_sync_point`); when it runs,
the guard leaves SIGTERM to it and `should_stop` asks it as well. A signal the service does not
see (Ctrl-C on one host, SIGTERM with the service disabled) only sets this host's flag: every
`AGREE_EVERY` steps all hosts exchange their flags (one tiny all-gather, which waits for the
step in flight) and all stop at that step if any host asked to.
"""

from __future__ import annotations

import logging
import signal
import threading
import warnings

import jax
import numpy as np
from jax.experimental import multihost_utils

try:  # private: where JAX keeps its preemption service (absent or moved: handled here)
    from jax._src import distributed as _jax_distributed
except ImportError:
    _jax_distributed = None

log = logging.getLogger(__name__)

AGREE_EVERY = 10  # steps between multi-host stop votes: a grace period is many steps long


def _preemption_service_running() -> bool:
    if jax.process_count() == 1:
        return False
    try:
        return _jax_distributed.global_state.preemption_sync_manager is not None
    except Exception:  # private API moved: assume absent, SIGTERM is then handled here
        return False


class PreemptionGuard:
    """Context manager that turns SIGTERM/SIGINT into a flag polled by the training loop."""

    def __init__(
        self,
        signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
        agree_every: int = AGREE_EVERY,
    ):
        self._signals = tuple(signals)
        self.agree_every = max(1, agree_every)
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

        Single process: the signal flag. Multi-process (call it at every step, on every host):
        JAX's preemption sync point, or the hosts' vote every `agree_every` steps; both are
        true on all hosts at the same step, so no host leaves the others in a collective.
        """
        if not self._multihost:
            return self._requested
        try:
            if multihost_utils.reached_preemption_sync_point(int(step)):
                self.signal_name = self.signal_name or "preemption sync point"
                return True
        except RuntimeError:  # preemption service disabled: the vote below decides
            pass
        if step % self.agree_every:
            return False
        votes = multihost_utils.process_allgather(np.int32(self._requested))
        if not np.any(votes):
            return False
        self.signal_name = self.signal_name or "another host's stop request"
        return True
