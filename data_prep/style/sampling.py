"""Style-embedding sampling and the batched stylizer.

The style-augmentation rule (Jackson et al.): for each image draw ``z_rand ~ N(mu, Sigma)`` (the Gaussian fitted to
the predictor's embeddings of Painter-by-Numbers paintings) and stylize with

    z = alpha * z_rand + (1 - alpha) * P(c)

where ``P(c)`` is the style predictor applied to the content image itself (alpha = 0.5 by default). Without a
predictor a fixed embedding (the public files' ImageNet mean embedding) stands in for ``P(c)``.

Randomness comes only from explicit ``torch.Generator`` s. :func:`sample_seed` derives one seed per (run seed, sample
key, copy), so a sample's style does not depend on batch composition, rank count or resumption.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .network import PREDICTOR_MIN_SIZE, STYLE_DIM, StylePredictor, StyleTransformer

log = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.5
CPU_CHUNK_PIXELS = 2 * 256 * 256


def sample_seed(seed: int, key: str, draw: int = 0) -> int:
    """A 63-bit seed for one style draw, from sha256(seed:key:draw) (stable across processes and Python runs)."""
    digest = hashlib.sha256(f"{seed}:{key}:{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def parse_ratio(text: str) -> tuple[int, int]:
    """``"u:a"`` (unaugmented : augmented, e.g. ``"16:1"`` ... ``"1:32"``) -> ``(u, a)`` with u, a >= 1 integers."""
    parts = str(text).split(":")
    try:
        u, a = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"ratio {text!r} is not of the form 'unaugmented:augmented', e.g. '16:1' or '1:32'") from None
    if u < 1 or a < 1:
        raise ValueError(f"ratio {text!r}: both sides must be >= 1")
    return u, a


def ratio_copies(index: int, unaug: int, aug: int) -> int:
    """Stylized copies for the ``index``-th image so that every prefix holds ``aug/unaug`` copies per original.

    ``floor((i+1)·a/u) - floor(i·a/u)``: exact over any run of ``u`` images, deterministic, no randomness.
    """
    return (index + 1) * aug // unaug - index * aug // unaug


def mix_embedding(z_rand: torch.Tensor, base: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """``alpha * z_rand + (1 - alpha) * base``; ``alpha`` is a scalar or one value per row."""
    if isinstance(alpha, torch.Tensor) and alpha.dim() == 1:
        alpha = alpha[:, None]
    return alpha * z_rand + (1 - alpha) * base


class EmbeddingSampler:
    """Draws ``z ~ N(mean, cov)`` as ``mean + A @ eps`` with ``A A^T = cov``.

    ``A`` comes from a symmetric eigendecomposition (``A = V sqrt(max(lambda, 0))``), which, unlike Cholesky, also
    works for a covariance that is only positive *semi*-definite (e.g. estimated from fewer samples than dims).
    """

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
        cov = torch.as_tensor(cov, dtype=torch.float64)
        d = mean.numel()
        if cov.shape != (d, d):
            raise ValueError(f"covariance must be {d}x{d} for a {d}-d mean, got {tuple(cov.shape)}")
        if not torch.isfinite(cov).all() or not torch.isfinite(mean).all():
            raise ValueError("embedding mean/covariance contain non-finite values")
        asym = (cov - cov.T).abs().max().item()
        if asym > 1e-6 * max(cov.abs().max().item(), 1e-12):
            raise ValueError(f"covariance is not symmetric (max |S - S^T| = {asym:.3g})")
        evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
        if evals.min().item() < -1e-6 * max(evals.max().item(), 1e-12):
            raise ValueError(f"covariance is not positive semi-definite (smallest eigenvalue {evals.min().item():.3g})")
        self.dim = d
        self.mean = mean
        self.cov = cov
        self.factor = evecs * evals.clamp_min(0).sqrt()  # [d, d], factor @ factor.T == cov

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws as a float32 ``[n, d]`` tensor (computed in float64, on CPU)."""
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.mean + eps @ self.factor.T).to(torch.float32)

    def sample_seeded(self, seeds: Sequence[int]) -> torch.Tensor:
        """One draw per seed (each from its own generator), so row i depends on ``seeds[i]`` only."""
        if not seeds:
            return torch.empty(0, self.dim)
        gen = torch.Generator()
        eps = torch.empty(len(seeds), self.dim, dtype=torch.float64)
        for i, s in enumerate(seeds):
            gen.manual_seed(int(s))
            eps[i] = torch.randn(self.dim, generator=gen, dtype=torch.float64)
        return (self.mean + eps @ self.factor.T).to(torch.float32)


def _split(n: int, size: int) -> Iterator[slice]:
    size = max(1, size)
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


class StyleRandomizer(nn.Module):
    """Transformer + optional predictor + embedding statistics: ``forward(images [0,1], z_rand) -> [0,1] images``.

    Always runs the networks in ``eval()`` under ``no_grad`` (outputs are plain tensors, safe to feed a training
    graph). On CUDA it uses channels_last and bf16 autocast (``precision="auto"``); on CPU fp32 and channels_last,
    in slices of about two 256² images (``chunk`` overrides) so activations stay in cache: on CPU, throughput
    *drops* with large batches.
    """

    def __init__(
        self,
        transformer: StyleTransformer,
        sampler: EmbeddingSampler,
        predictor: StylePredictor | None = None,
        base_embedding: torch.Tensor | None = None,
        alpha: float = DEFAULT_ALPHA,
        precision: str = "auto",
        chunk: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
        self.transformer = transformer.eval()
        self.predictor = predictor.eval() if predictor is not None else None
        self.sampler = sampler
        base = sampler.mean if base_embedding is None else torch.as_tensor(base_embedding, dtype=torch.float64)
        if base.numel() != sampler.dim:
            raise ValueError(f"base embedding has {base.numel()} values, expected {sampler.dim}")
        self.register_buffer("base_embedding", base.flatten().to(torch.float32), persistent=False)
        self.alpha = alpha
        self.precision = precision
        self.chunk = chunk
        self._cl_device: torch.device | None = None
        self._warned_small = False

    @property
    def device(self) -> torch.device:
        return self.base_embedding.device

    def train(self, mode: bool = True) -> StyleRandomizer:
        """Stays in eval mode: a parent's ``.train()`` must not switch the predictor's BatchNorm to batch stats."""
        return super().train(False)

    def _autocast(self) -> contextlib.AbstractContextManager:
        dev = self.device
        bf16 = self.precision == "bf16" or (self.precision == "auto" and dev.type == "cuda")
        if bf16:
            return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _chunk_size(self, n: int, h: int, w: int) -> int:
        if self.chunk > 0:
            return self.chunk
        if self.device.type == "cuda":
            return n
        # CPU: about 2 images of 256² per call keeps the 32-channel full-resolution maps (~8 MB each) in L2/L3.
        return max(1, CPU_CHUNK_PIXELS // (h * w))

    def _ensure_channels_last(self) -> None:
        if self._cl_device != self.device:
            self.transformer.to(memory_format=torch.channels_last)
            if self.predictor is not None:
                self.predictor.to(memory_format=torch.channels_last)
            self._cl_device = self.device

    def base_for(self, images: torch.Tensor) -> torch.Tensor:
        """P(c) for each image (predictor), or the fixed base embedding repeated."""
        if self.predictor is None:
            return self.base_embedding.expand(images.shape[0], -1)
        h, w = images.shape[-2:]
        least = getattr(self.predictor, "min_size", PREDICTOR_MIN_SIZE)
        if min(h, w) < least:
            # P(c) is a global style statistic: the predictor sees an upsampled copy (its trunk needs `least` px);
            # the image that is stylized keeps its size
            scale = least / min(h, w)
            size = (max(least, math.ceil(h * scale)), max(least, math.ceil(w * scale)))
            if not self._warned_small:
                log.warning("images of %dx%d are below the style predictor's minimum %d px: the predictor sees "
                            "them upsampled to %dx%d", h, w, least, *size)  # fmt: skip
                self._warned_small = True
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        return self.predictor(images).float()

    @torch.no_grad()
    def predict_base(self, images: torch.Tensor) -> torch.Tensor:
        """P(c) for ``images`` ([B,3,H,W] in [0,1]) as float32 [B,100] on this device, chunked like :meth:`forward`.

        Lets a caller that stylizes the same image several times run the predictor once (pass ``base=``).
        """
        if self.predictor is None:
            return self.base_embedding.expand(images.shape[0], -1).clone()
        self._ensure_channels_last()
        out = torch.empty(images.shape[0], self.sampler.dim, device=self.device)
        with self._autocast():
            for sl in _split(images.shape[0], self._chunk_size(images.shape[0], *images.shape[-2:])):
                x = images[sl].to(self.device, torch.float32).contiguous(memory_format=torch.channels_last)
                out[sl] = self.base_for(x)
        return out

    @torch.no_grad()
    def forward(
        self,
        images: torch.Tensor,
        z_rand: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        alpha: float | torch.Tensor | None = None,
        base: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Stylize ``images`` ([B,3,H,W] in [0,1], any H,W >= 8). ``z_rand`` [B,100] defaults to fresh draws;
        ``base`` [B,100] (from :meth:`predict_base`) skips the predictor."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B,3,H,W], got {tuple(images.shape)}")
        n = images.shape[0]
        if z_rand is None:
            z_rand = self.sampler.sample(n, generator)
        if z_rand.shape != (n, self.sampler.dim):
            raise ValueError(f"z_rand must be [{n},{self.sampler.dim}], got {tuple(z_rand.shape)}")
        if base is not None and base.shape != (n, self.sampler.dim):
            raise ValueError(f"base must be [{n},{self.sampler.dim}], got {tuple(base.shape)}")
        alpha = self.alpha if alpha is None else alpha
        dev = self.device
        self._ensure_channels_last()
        out = torch.empty(images.shape, dtype=torch.float32, device=dev)
        z_rand = z_rand.to(dev, torch.float32)
        if isinstance(alpha, torch.Tensor):
            alpha = alpha.to(dev, torch.float32)
        with self._autocast():
            for sl in _split(n, self._chunk_size(n, *images.shape[-2:])):
                x = images[sl].to(dev, torch.float32).contiguous(memory_format=torch.channels_last)
                a = alpha[sl] if isinstance(alpha, torch.Tensor) and alpha.dim() == 1 else alpha
                b = self.base_for(x) if base is None else base[sl].to(dev, torch.float32)
                z = mix_embedding(z_rand[sl], b, a)
                out[sl] = self.transformer(x, z).float()
        return out


__all__ = [
    "DEFAULT_ALPHA",
    "EmbeddingSampler",
    "STYLE_DIM",
    "StyleRandomizer",
    "mix_embedding",
    "parse_ratio",
    "ratio_copies",
    "sample_seed",
]
