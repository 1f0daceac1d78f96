"""Preemption signals: a handler that only sets a flag; the training loop checks it at step boundaries.

The loop agrees on the flag across ranks (all-reduce), writes a checkpoint on every rank, then calls
:func:`after_checkpoint`, which asks the scheduler to requeue the job (a no-op outside slurm).
"""

from __future__ import annotations

import signal
import threading

_requested = threading.Event()
_installed = False


def _handler(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    _requested.set()


def install(signals: tuple[int, ...] = (signal.SIGUSR2, signal.SIGTERM)) -> None:
    """Install the flag-setting handler (main thread only; idempotent)."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    for sig in signals:
        signal.signal(sig, _handler)
    _installed = True


def requested() -> bool:
    return _requested.is_set()


def request() -> None:
    """Ask for a checkpoint-and-stop at the next step boundary (tests, or a custom signal path)."""
    _requested.set()


def clear() -> None:
    _requested.clear()


def after_checkpoint() -> None:
    """Called by the loop once the preemption checkpoint is on disk. Requeue logic lives in launch.slurm."""
    try:
        from launch import slurm
    except ImportError:
        return
    hook = getattr(slurm, "requeue_after_checkpoint", None)
    if callable(hook):
        hook()
