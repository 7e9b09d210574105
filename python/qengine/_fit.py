"""Pieces shared by every code that fits codes to data (qengine.quantize / fit_codebook and
qengine.calibrate): what a block size argument means, and a codebook's start and validity."""

from __future__ import annotations

from typing import Optional

import torch

from ._checks import check_blocksize


def resolve_blocksize(x: torch.Tensor, blocksize: Optional[int]) -> tuple[int, bool]:
    if blocksize is None:  # per row (per output channel of a weight)
        return (x.shape[-1] if x.dim() >= 1 else 1), True
    return check_blocksize(blocksize), False


def finite_blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """x flattened to float32 and cut into blocks [ceil(numel / blocksize), blocksize], the last
    padded with zeros; ValueError if x holds NaN or Inf (a non-finite weight has no faithful code)."""
    flat = x.detach().reshape(-1).to(torch.float32)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("x contains NaN or Inf values; a non-finite weight has no faithful code")
    pad = -flat.numel() % blocksize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.reshape(-1, blocksize)


def quantile_init(x: torch.Tensor, blocksize: int, rule: str, k: int, sample: int, seed: int) -> list[float]:
    """Quantiles of the block-normalised values of a random sample of blocks."""
    flat = x.reshape(-1)
    full = flat.numel() // blocksize
    gen = torch.Generator().manual_seed(seed)
    take = min(full, max(1, sample // blocksize))
    if full == 0:
        blocks = flat.float().reshape(1, -1)
    else:
        idx = torch.randperm(full, generator=gen)[:take]
        blocks = flat[: full * blocksize].reshape(full, blocksize)[idx].float()
    if not torch.isfinite(blocks).all():
        raise ValueError("weight contains NaN or Inf values")
    if rule == "absmax":
        norm = blocks / blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-38)
    else:
        lo = blocks.amin(dim=1, keepdim=True)
        norm = (blocks - lo) / (blocks.amax(dim=1, keepdim=True) - lo).clamp(min=1e-38)
    norm = norm.reshape(-1).double()
    qs = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    if norm.numel() > 1 << 24:  # torch.quantile's input limit
        norm = norm[torch.randperm(norm.numel(), generator=gen)[: 1 << 24]]
    init = torch.quantile(norm, qs)
    return strictly_increasing(init, rule).tolist()


def strictly_increasing(v: torch.Tensor, rule: str) -> torch.Tensor:
    """Clamps into the rule's range and nudges duplicates apart (float32-distinct), so the
    result is a valid codebook even when the data has fewer distinct values than codes."""
    lo, hi = (-1.0, 1.0) if rule == "absmax" else (0.0, 1.0)
    v = v.to(torch.float32).clamp(lo, hi).sort().values
    out = v.tolist()
    for i in range(1, len(out)):
        if out[i] <= out[i - 1]:
            out[i] = float(torch.nextafter(torch.tensor(out[i - 1]), torch.tensor(2.0)))
    # Walk back from the top if nudging pushed past the upper bound.
    if out[-1] > hi:
        out[-1] = hi
        for i in range(len(out) - 2, -1, -1):
            if out[i] >= out[i + 1]:
                out[i] = float(torch.nextafter(torch.tensor(out[i + 1]), torch.tensor(-2.0)))
    return torch.tensor(out, dtype=torch.float64)
