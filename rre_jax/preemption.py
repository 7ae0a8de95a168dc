"""Preemption: on SIGTERM every host stops at one common step boundary, where the run saves and exits 0.

Spot and preemptible TPU VMs receive SIGTERM shortly (about 30 s on Cloud TPU) before they are taken away.
``Watch.reached(step)`` is called by every host after every training step and returns True on every host at the
same step once any host has had the notice; the run then saves a checkpoint of that step and stops, and the next
``rre-train`` with the same ``--workdir`` resumes from it as if uninterrupted.

* Multi-process runs (``jax.distributed``): JAX's preemption sync manager. Its coordination service hears the
  SIGTERM on any host, collects every host's last reported step and picks the next boundary all can reach (the
  largest + 1): ``multihost_utils.reached_preemption_sync_point(step)`` is True on every host at that step. The
  manager installs its own SIGTERM handler at ``jax.distributed.initialize``; nothing here replaces it.
* A single process has no coordination service: ``Watch`` installs a SIGTERM handler for the duration of the
  loop that records the notice, and the next step boundary is the sync point (the same semantics, one host).
"""
from __future__ import annotations

import logging
import signal
import threading

import jax
from jax._src import distributed
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


def _coordinated() -> bool:
    """Whether the JAX coordination service (``jax.distributed``) runs in this process."""
    return distributed.global_state.client is not None


class Watch:
    """Context manager over a training loop: ``reached(step)`` says whether to save at ``step`` and stop."""

    def __init__(self):
        self._notice = False
        self._previous = None
        self._coordinated = _coordinated()

    def __enter__(self) -> "Watch":
        if self._coordinated:
            if distributed.global_state.preemption_sync_manager is None:
                log.warning("jax_enable_preemption_service is off: a SIGTERM stops this run without a checkpoint "
                            "(the last save is where it resumes)")
                self._coordinated = None
        elif threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum, frame) -> None:
        self._notice = True
        log.warning("SIGTERM: saving a checkpoint at the end of this step, then stopping")

    def reached(self, step: int) -> bool:
        """True (on every host at the same ``step``) when the run must save at ``step`` and stop. Every host
        calls it after every step, from the same first step."""
        if self._coordinated:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self._notice and jax.process_count() == 1
