"""Preemption signals: a handler that only sets a flag; the training loop checks it at step boundaries.

The loop agrees on the flag across ranks (all-reduce), writes a checkpoint on every rank, then calls
:func:`after_checkpoint`. Whoever started the process decides what that means: under ``python -m launch slurm``
the task wrapper registers a hook (:func:`set_after_checkpoint_hook`) that asks Slurm to requeue the job (rank 0
only, the checkpoint being on disk by then); under torchrun or a plain process nothing is registered and the run
simply stops with its checkpoint written.

Why a flag and not work in the handler: a signal arrives on every rank at a slightly different moment, usually in
the middle of a step; saving from inside the handler would race the collectives of the step in flight.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

_requested = threading.Event()
_checkpointed = threading.Event()
_reasons: list[str] = []
_installed: tuple[int, ...] = ()
_hook: Callable[[], None] | None = None


def _handler(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    # keep the handler minimal: no logging locks, no IO (it may interrupt either)
    _reasons.append(signal.Signals(signum).name)
    _requested.set()


def install(signals: Iterable[int] = (signal.SIGUSR2, signal.SIGTERM)) -> None:
    """Install the flag-setting handler for ``signals`` (main thread only; the first call wins).

    Idempotent on purpose: the slurm task wrapper installs USR2 only (Slurm's SIGTERM means cancel, and submitit
    logs and ignores it) before the entry runs, and the engine's later default ``install()`` must not widen that.
    """
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    sigs = tuple(signals)
    for sig in sigs:
        signal.signal(sig, _handler)
    _installed = sigs


def installed_signals() -> tuple[int, ...]:
    """The signals the flag handler is installed for (empty before :func:`install`)."""
    return _installed


def requested() -> bool:
    """True once a preemption signal arrived (or :func:`request` was called)."""
    return _requested.is_set()


def request(reason: str = "request") -> None:
    """Ask for a checkpoint-and-stop at the next step boundary (tests, or a custom signal path)."""
    _reasons.append(reason)
    _requested.set()


def reasons() -> list[str]:
    """What set the flag, in arrival order (signal names such as ``SIGUSR2``, or the reason passed to request)."""
    return list(_reasons)


def clear() -> None:
    """Reset the flag, the reasons and the checkpointed state (tests; an in-process runner between runs)."""
    _requested.clear()
    _checkpointed.clear()
    _reasons.clear()


def set_after_checkpoint_hook(hook: Callable[[], None] | None) -> None:
    """Register what :func:`after_checkpoint` runs (the slurm task wrapper's requeue); None removes it."""
    global _hook
    _hook = hook


def after_checkpoint() -> None:
    """Called by the loop on every rank once the preemption checkpoint is on disk (after its barrier).

    Marks the run as stopped-with-checkpoint and runs the registered hook, if any. The hook must not call
    collectives: a rank may get here a little before the others.
    """
    _checkpointed.set()
    if _hook is not None:
        _hook()


def checkpointed() -> bool:
    """True if the loop stopped early for preemption and reported its checkpoint (see :func:`after_checkpoint`)."""
    return _checkpointed.is_set()
