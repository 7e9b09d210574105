"""Error-correcting side path (EoRA-style): LoRA factors A, B chosen so that the quantized weight
plus the side path best match the float layer's *outputs* on calibration inputs X:

    minimise ||X (W - Ŵ - s·B A)^T||_F  =  ||(E - s·B A) H^{1/2}||_F,   E = W - Ŵ,  H = X^T X

solved exactly by the rank-r truncated SVD of E H^{1/2} mapped back through H^{-1/2} (H damped
by a fraction of its mean diagonal so the inverse root exists). What add_lora(init="correct")
runs; LoftQ's weight-only fit (qengine.loftq) is the same with H = I."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from ..nn import QuantLinear
from .plan import each_hessian

__all__ = ["correction_factors", "correct_layers"]


def correction_factors(w: torch.Tensor, w_hat: torch.Tensor, H: Optional[torch.Tensor], r: int, scaling: float = 1.0,
                       damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(A float32 [r, in], B float32 [out, r]) with scaling * B @ A the rank-r matrix closest to
    E = w - w_hat in the H-weighted norm ||(E - scaling·B A) H^{1/2}||_F.

    w, w_hat: float [out, in] (the float weight and the dequantized one); H: float [in, in], sum
    of x x^T over calibration inputs (None: the identity, i.e. LoftQ's plain SVD); damp: added to
    H's diagonal as a fraction of its mean (>= 0; with 0, H must be positive definite)."""
    if w.dim() != 2 or w.shape != w_hat.shape:
        raise ValueError(f"w and w_hat must be 2-D of one shape, got {tuple(w.shape)} and {tuple(w_hat.shape)}")
    out_f, in_f = w.shape
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(out_f, in_f):
        raise ValueError(f"rank r must be an int in [1, min(out, in) = {min(out_f, in_f)}], got {r!r}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp < 0:
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    E = w.detach().double() - w_hat.detach().double()
    if H is None:
        root, inv_root = None, None
    else:
        if H.shape != (in_f, in_f):
            raise ValueError(f"H must be [{in_f}, {in_f}] for a weight of {in_f} inputs, got {tuple(H.shape)}")
        H64 = H.detach().double()
        H64 = H64 + damp * H64.diagonal().mean().clamp_min(1e-30) * torch.eye(in_f, dtype=torch.float64,
                                                                                device=H.device)
        evals, V = torch.linalg.eigh(H64)
        if not bool(torch.isfinite(evals).all()) or float(evals.min()) <= 0:
            raise ValueError("H is not positive definite even after damping: raise damp or use more calibration data")
        root = (V * evals.sqrt()) @ V.T
        inv_root = (V * evals.rsqrt()) @ V.T
    M = E if root is None else E @ root
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    half = (S[:r] / scaling).sqrt()
    B = U[:, :r] * half
    A = half[:, None] * Vh[:r]
    if inv_root is not None:
        A = A @ inv_root
    return A.float(), B.float()


def correct_layers(model: nn.Module, reference: nn.Module, calibration, names: Sequence[str], r: int,
                   scaling: float, damp: float = 0.01) -> dict:
    """{name: (A, B)} for each named QuantLinear of `model`, fitted against the same-named float
    nn.Linear of `reference` on the inputs that layer receives while `reference` runs
    `calibration` (one decoder block's H resident at a time)."""
    if not isinstance(reference, nn.Module):
        raise TypeError("init='correct' needs reference=, the float model the quantized one was made from")
    for n in names:
        try:
            ref = reference.get_submodule(n)
        except AttributeError:
            raise ValueError(f"reference model has no module {n!r} (it must be the float model the quantized one "
                             "was made from)") from None
        mine = model.get_submodule(n)
        if not isinstance(ref, nn.Linear) or not isinstance(mine, QuantLinear):
            raise ValueError(f"{n}: init='correct' fits a QuantLinear against the reference's float nn.Linear, got "
                             f"{type(mine).__name__} and {type(ref).__name__}")
        if tuple(ref.weight.shape) != (mine.out_features, mine.in_features):
            raise ValueError(f"{n}: reference weight {tuple(ref.weight.shape)} does not match the quantized layer's "
                             f"({mine.out_features}, {mine.in_features})")
    if calibration is None:
        raise ValueError("init='correct' needs calibration= (token ids [batch, seq_len] of real text): the side path "
                         "is fitted to the layers' outputs on it")
    out: dict = {}

    def fit(name, H, rows):
        w = reference.get_submodule(name).weight
        w_hat = model.get_submodule(name).quantized().dequantize(torch.float32)
        out[name] = correction_factors(w, w_hat, H, r, scaling, damp)

    each_hessian(reference, list(names), calibration, fit)
    missing = [n for n in names if n not in out]
    if missing:
        raise ValueError(f"no calibration data reached {missing[0]} in the reference model")
    return out

