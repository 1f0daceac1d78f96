"""The exact-resume position every training loader shares: (epoch, step) over epochs of ``steps_per_epoch``
batches, checked against a fingerprint of what makes the batch sequence what it is.

The engine's loader protocol is ``iter()``, ``state_dict()``, ``load_state_dict(state)``, ``set_epoch(n)``,
``steps_per_epoch``, ``epoch`` and ``skipped``. :class:`ResumableLoader` implements it once; a reader (the shard
loader, the fine-tuning caption and label loaders, a VQA or grounding reader) subclasses it and provides:

* ``steps_per_epoch`` (an attribute or property): batches per epoch on this rank;
* ``fingerprint() -> dict``: plain values that must be equal for an exact resume (seed, data size, batch size,
  world size, ...); a saved state with other values is refused with the differing keys named;
* ``batches(epoch, step) -> Iterator[dict]``: this rank's batches from step ``step`` of ``epoch`` on, a pure
  function of its arguments (seeded by them); it may stop at the end of the epoch or run on into the next ones.

and may override the hooks ``on_batch(batch)`` (per batch handed out, before the position advances: count
``batch["skipped"]``, pop metadata), ``on_epoch_end()``, ``extra_state()`` / ``load_extra_state(state, exact)``
and ``approximate_resume(state, diff)`` (``load_state_dict(strict=False)``; the default refuses).

``state_dict()`` describes the batches the caller consumed (not those a DataLoader prefetched): resuming a new
loader from it yields exactly the batches the old one would have yielded next. ``iter()`` always continues from
that position; an older iterator stops when a newer one (or ``load_state_dict``) takes over.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class ResumableLoader:
    """Base class of the training loaders: position, resume and iteration (see the module docstring)."""

    steps_per_epoch: int

    def __init__(self) -> None:
        self._epoch = 0
        self._step = 0
        self._generation = 0  # bumped by iter() and load_state_dict(): older iterators stop
        self.skipped = 0  # samples skipped (unreadable, corrupt) in the batches handed out so far

    # --- what a reader provides
    def fingerprint(self) -> dict[str, Any]:
        raise NotImplementedError

    def batches(self, epoch: int, step: int) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    # --- optional hooks
    def on_batch(self, batch: dict[str, Any]) -> None:
        """Called for each batch before it is handed out (``self.step`` is its step)."""
        self.skipped += int(batch.get("skipped", 0) or 0)

    def on_epoch_end(self) -> None:
        """Called when the position rolls over to the next epoch."""

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any], exact: bool) -> None:
        """Restore what :meth:`extra_state` saved; ``exact`` is False after an approximate resume."""

    def approximate_resume(self, state: dict[str, Any], diff: dict[str, tuple[Any, Any]]) -> None:
        """``load_state_dict(strict=False)`` with a fingerprint ``diff`` (key: (saved, now)); default: refuse."""
        _refuse(diff)

    # --- the position
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def step(self) -> int:
        """Batches consumed in the current epoch."""
        return self._step

    def state_dict(self) -> dict[str, Any]:
        """The position after the batches consumed so far (plain values, safe for ``weights_only`` loading)."""
        return {
            "epoch": self._epoch,
            "step": self._step,
            "skipped": self.skipped,
            "fingerprint": self.fingerprint(),
            **self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Resume at ``state``'s position; a state of another setup raises ValueError naming what differs
        (``strict=False``: :meth:`approximate_resume` decides)."""
        mine, theirs = self.fingerprint(), state.get("fingerprint") or {}
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        self._generation += 1
        self.skipped = int(state.get("skipped", 0))
        if diff:
            if strict:
                _refuse(diff)
            self.approximate_resume(state, diff)
            self.load_extra_state(state, exact=False)
            return
        epoch, step = int(state["epoch"]), int(state["step"])
        if not 0 <= step < self.steps_per_epoch or epoch < 0:
            raise ValueError(
                f"loader state position epoch {epoch} step {step} is outside an epoch of {self.steps_per_epoch} steps"
            )
        self._epoch, self._step = epoch, step
        self.load_extra_state(state, exact=True)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch (no-op when already in it)."""
        if int(epoch) != self._epoch:
            self._epoch, self._step = int(epoch), 0
            self.on_epoch_end()

    # --- iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._generation += 1
        return self._consume(self.batches(self._epoch, self._step), self._generation)

    def _consume(self, source: Iterator[dict[str, Any]], generation: int) -> Iterator[dict[str, Any]]:
        try:
            for batch in source:
                if generation != self._generation:
                    return  # a newer iter() or load_state_dict took over
                self.on_batch(batch)
                self._step += 1
                if self._step == self.steps_per_epoch:
                    self._epoch, self._step = self._epoch + 1, 0
                    self.on_epoch_end()
                yield batch
        finally:
            close = getattr(source, "close", None)
            if callable(close):
                close()  # stops DataLoader workers now, not at garbage collection


def _refuse(diff: dict[str, tuple[Any, Any]]) -> None:
    detail = ", ".join(f"{k}: saved {a!r} now {b!r}" for k, (a, b) in diff.items())
    raise ValueError(f"loader state does not match this loader ({detail}); exact resume impossible")
