"""Stopping a run cleanly: SIGTERM (preemption, a scheduler) or a first Ctrl-C."""

from __future__ import annotations

import signal
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils


SIGNALLED, TAKEN_OVER = 'signalled', 'taken over'


class StopFlag:
    """Set by SIGTERM or a first Ctrl-C (SIGINT); agreed across processes so that all of
    them save a checkpoint after the current step and stop. A second Ctrl-C interrupts at
    once, as without it. ``restore`` puts the previous handlers back."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = None  # the first signal's name
        self._previous = {}
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass

    def _handle(self, signum, frame):
        del frame
        if signum == signal.SIGINT:
            if self.received is not None:
                raise KeyboardInterrupt
            print('\nCtrl-C: saving a checkpoint after this step, then stopping (Ctrl-C '
                  'again to stop at once, losing the steps since the last checkpoint).',
                  file=sys.stderr, flush=True)
        self.received = self.received or signal.Signals(signum).name

    def any_process(self, taken_over: bool = False) -> str | None:
        """Why every process stops after this step, agreed between them (a collective:
        all call it): ``TAKEN_OVER`` when another run has taken the workdir (``taken_over``
        on any process; stop without saving), ``SIGNALLED`` when any process received a
        stop signal (save, then stop), else None."""
        mine = 2 if taken_over else int(self.received is not None)
        if jax.process_count() > 1:
            mine = int(np.max(multihost_utils.process_allgather(np.int32(mine))))
        return (None, SIGNALLED, TAKEN_OVER)[mine]

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:  # None: a handler not installed from Python
                signal.signal(signum, previous)
