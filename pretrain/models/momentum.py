"""Momentum (EMA) encoders and MoCo-style feature queues, as used by ALBEF and TCL.

Momentum copies are ordinary submodules with ``requires_grad=False`` and the queues are persistent buffers, so both
travel in ``state_dict`` and a checkpoint restores them exactly.

Both stay float32 when the model is cast to bf16 (DeepSpeed's ``bf16`` casts the whole module): an EMA with
``m = 0.995`` stored in bf16 (8 mantissa bits) rounds most updates ``(1 - m) * (p - p_m)`` away and the momentum
encoder would barely move. The momentum forward then runs under bf16 autocast (:func:`autocast_like`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn


class KeepFloat32:
    """Mixin for modules whose floating tensors must stay float32 through ``.to(dtype)``/``.bfloat16()``/``.half()``
    (device moves still apply)."""

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):  # type: ignore[override]
        def keep(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if t.is_floating_point() and out.is_floating_point() and out.dtype != torch.float32:
                out = out.float()
            return out

        return super()._apply(keep, recurse)  # type: ignore[misc]


class MomentumModules(KeepFloat32, nn.ModuleDict):
    """The momentum twins, kept in float32 (see the module docstring)."""


def autocast_like(reference: torch.Tensor) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on ``reference``'s device when it has that dtype (the online model's), else nothing."""
    if reference.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(reference.device.type, dtype=reference.dtype)
    return contextlib.nullcontext()


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy of ``module`` (weight ties inside it are kept)."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def momentum_pairs(
    online: Sequence[nn.Module], momentum: Sequence[nn.Module]
) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(online, momentum) parameter pairs, matched by name; raises if the two sides differ in structure."""
    pairs = []
    for src, dst in zip(online, momentum, strict=True):
        src_params = dict(src.named_parameters())
        dst_params = dict(dst.named_parameters())
        if src_params.keys() != dst_params.keys():
            raise ValueError(f"momentum copy of {type(src).__name__} has different parameters")
        pairs.extend((src_params[k], dst_params[k]) for k in src_params)
    return pairs


@torch.no_grad()
def ema_update(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], m: float) -> None:
    """``p_m <- m * p_m + (1 - m) * p`` for every pair."""
    if not pairs:
        return
    online = [p.detach().to(q.dtype) for p, q in pairs]
    target = [q for _, q in pairs]
    torch._foreach_mul_(target, m)
    torch._foreach_add_(target, online, alpha=1.0 - m)


@torch.no_grad()
def copy_params(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Make the momentum side equal to the online side (at build time)."""
    for p, q in pairs:
        q.copy_(p.detach())


@torch.no_grad()
def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (rank order), without gradient; identity when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class FeatureQueues(KeepFloat32, nn.Module):
    """Named FIFO queues of L2-normalised features ``[size, dim]`` sharing one write pointer.

    Initialised with normalised Gaussian noise (as in ALBEF). ``enqueue`` all-gathers the new rows from every rank
    first, so all ranks hold identical queues. ``size`` must be a multiple of the global batch (ALBEF's rule, checked
    with a clear error): the pointer then advances by whole batches. Writes wrap modulo ``size`` so that a batch of
    another size (which leaves the pointer unaligned) cannot overflow.
    """

    def __init__(self, names: Sequence[str], dim: int, size: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"queue_size={size}: must be >= 1")
        self.names = tuple(names)
        self.size = size
        for name in self.names:
            self.register_buffer(f"{name}_queue", nn.functional.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def get(self, name: str) -> torch.Tensor:
        """The queue ``name`` ``[size, dim]`` (detached clone: later enqueues do not alter it)."""
        return getattr(self, f"{name}_queue").detach().clone()

    def check_batch(self, local_batch: int, world: int | None = None) -> None:
        """Raise a clear error when the global batch does not divide the queue size."""
        world = world_size() if world is None else world
        global_batch = local_batch * world
        if global_batch > self.size or self.size % global_batch != 0:
            raise ValueError(
                f"model.queue_size={self.size} must be a multiple of the global batch "
                f"(data.batch_size {local_batch} x world size {world} = {global_batch}); "
                f"e.g. queue_size={max(1, self.size // global_batch) * global_batch}"
            )

    @torch.no_grad()
    def enqueue(self, **feats: torch.Tensor) -> None:
        """Write the all-gathered ``feats[name]`` ``[B, dim]`` at the pointer and advance it by the global batch."""
        if set(feats) != set(self.names):
            raise ValueError(f"enqueue needs exactly {self.names}, got {sorted(feats)}")
        gathered = {name: all_gather_nograd(x) for name, x in feats.items()}
        n = next(iter(gathered.values())).shape[0]
        self.check_batch(n, world=1)
        ptr = int(self.queue_ptr)
        # modular rows: with a fixed batch the write never wraps, but a batch-size change (e.g. a batch of one)
        # may leave the pointer unaligned and must not overflow the queue
        rows = (ptr + torch.arange(n, device=self.queue_ptr.device)) % self.size
        for name, x in gathered.items():
            queue = getattr(self, f"{name}_queue")
            queue.index_copy_(0, rows.to(queue.device), x.to(queue.dtype))
        self.queue_ptr.fill_((ptr + n) % self.size)
