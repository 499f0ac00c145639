"""Structured attention inputs for tests, examples and benchmarks.

Random q/k give attention with almost no sparsity. Video attention is local: tokens sit on a
(frames, height, width) grid and attend mostly to their neighbours. ``structured_qkv`` builds
q and k whose dot product is ``-sharpness * |p_r - p_c|^2`` (plus a small random content term)
for grid positions p, hidden in ``head_dim`` dimensions by a random rotation per head.
``StructuredSequence`` yields such inputs over several "denoising steps" that drift slowly.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence, Tuple

import torch

__all__ = ["grid_for", "structured_qkv", "StructuredSequence"]


def grid_for(seq: int) -> Tuple[int, int, int]:
    """A (frames, height, width) grid with at least ``seq`` cells, roughly video-shaped."""
    side = max(1, math.ceil((seq / 4) ** 0.5))
    frames = math.ceil(seq / (side * side))
    return frames, side, side


def _positions(seq: int, grid: Optional[Sequence[int]]) -> torch.Tensor:
    frames, height, width = grid if grid is not None else grid_for(seq)
    if frames * height * width < seq:
        raise ValueError(f"grid {tuple(grid)} has fewer than {seq} cells")
    t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    pos = torch.stack([t, y, x], dim=-1).reshape(-1, 3).to(torch.float64)
    # Centred, so that |p|^2 (and with it the size of q and k) stays moderate.
    return (pos - pos.mean(dim=0))[:seq]  # (S, 3)


def structured_qkv(batch: int, seq_q: int, heads: int, head_dim: int, *, seq_k: Optional[int] = None,
                   value_dim: Optional[int] = None, sharpness: Tuple[float, float] = (0.3, 3.0),
                   content: float = 0.5, grid: Optional[Sequence[int]] = None, seed: int = 0,
                   dtype: torch.dtype = torch.float32, device="cpu"):
    """q ``(B, Sq, H, D)``, k ``(B, Sk, H, D)``, v ``(B, Sk, H, Dv)`` with local (positional) attention.

    With the default scale ``1/sqrt(D)``, ``scale * <q_r, k_c> = -a_h |p_r - p_c|^2 + row const + noise``,
    where ``a_h`` is spread over ``sharpness`` across heads and the noise has std about ``content``.
    """
    seq_k = seq_q if seq_k is None else seq_k
    value_dim = head_dim if value_dim is None else value_dim
    if head_dim < 8:
        raise ValueError(f"head_dim must be >= 8 for structured inputs, got {head_dim}")
    gen = torch.Generator().manual_seed(seed)
    pos_q = _positions(seq_q, grid)
    pos_k = _positions(seq_k, grid)
    a = torch.logspace(math.log10(sharpness[0]), math.log10(sharpness[1]), heads, dtype=torch.float64)
    root_d = math.sqrt(head_dim)
    q = torch.empty(batch, seq_q, heads, head_dim, dtype=torch.float64)
    k = torch.empty(batch, seq_k, heads, head_dim, dtype=torch.float64)
    n_content = head_dim - 4
    for h in range(heads):
        rot, _ = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64))
        qf = torch.cat([2 * a[h] * pos_q, a[h].expand(seq_q, 1)], dim=1)  # (Sq, 4)
        kf = torch.cat([pos_k, -(pos_k ** 2).sum(1, keepdim=True)], dim=1)  # (Sk, 4)
        for b in range(batch):
            shift = torch.randn(3, generator=gen, dtype=torch.float64) * 0.3  # per-sample offset
            kf_b = torch.cat([pos_k + shift, -((pos_k + shift) ** 2).sum(1, keepdim=True)], dim=1)
            qc = torch.randn(seq_q, n_content, generator=gen, dtype=torch.float64)
            kc = torch.randn(seq_k, n_content, generator=gen, dtype=torch.float64)
            c = math.sqrt(content) / n_content ** 0.25
            q[b, :, h] = torch.cat([qf, c * qc], dim=1) @ rot * root_d ** 0.5
            k[b, :, h] = torch.cat([kf_b if b else kf, c * kc], dim=1) @ rot * root_d ** 0.5
    v = torch.randn(batch, seq_k, heads, value_dim, generator=gen, dtype=torch.float64)
    return q.to(dtype=dtype, device=device), k.to(dtype=dtype, device=device), v.to(dtype=dtype, device=device)


class StructuredSequence:
    """Inputs of consecutive denoising steps: ``structured_qkv`` plus a slow random drift.

    ``for q, k, v in StructuredSequence(steps=5, batch=1, seq_q=250, heads=2, head_dim=32): ...``
    Step ``n`` moves q and k along fixed random directions, scaled so that the scores
    ``scale * <q, k>`` change by about ``drift * n`` (natural-log units, std); v moves by
    ``drift * n`` of its std. Consecutive steps stay close, as in a diffusion sampler.
    """

    def __init__(self, steps: int, batch: int, seq_q: int, heads: int, head_dim: int, *, drift: float = 0.02,
                 seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu", **kwargs):
        self.steps, self.drift = steps, drift
        self.dtype, self.device = dtype, device
        base = structured_qkv(batch, seq_q, heads, head_dim, seed=seed, **kwargs)
        gen = torch.Generator().manual_seed(seed + 1)
        self.base = base
        q, k, v = base
        scale = q.shape[-1] ** -0.5
        # Per-head rms norm of the other side, so that scale * <dq, k> has std ~ 1 per unit of drift.
        rms = lambda t: t.float().pow(2).sum(-1).mean(dim=(0, 1)).sqrt()  # (H,)
        sq, sk = 1.0 / (scale * rms(k)), 1.0 / (scale * rms(q))
        self.directions = [
            torch.randn(q.shape, generator=gen) * sq[:, None] / math.sqrt(2),
            torch.randn(k.shape, generator=gen) * sk[:, None] / math.sqrt(2),
            torch.randn(v.shape, generator=gen) * v.float().std(),
        ]

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for n in range(self.steps):
            yield tuple((t + self.drift * n * d).to(dtype=self.dtype, device=self.device)
                        for t, d in zip(self.base, self.directions))
