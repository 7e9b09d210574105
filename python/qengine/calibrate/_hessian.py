"""The layer Hessian H = sum of x x^T over calibration inputs, checked and turned into what GPTQ
needs: the upper Cholesky factor of the damped inverse, in the sweep's column order."""

from __future__ import annotations

import math
from typing import Optional

import torch

# A Hessian that is not symmetric to this relative tolerance is refused (a transposed or
# unrelated matrix), while the rounding of X^T X accumulated in float32 is accepted.
SYMMETRY_RTOL = 1e-3


def check_hessian(H: object, cols: int, device: torch.device) -> torch.Tensor:
    """H as float64 [cols, cols] (a copy; the caller's tensor is never modified).

    H: float32 or float64 [cols, cols] on the weight's device, finite, symmetric, with a
    non-negative diagonal (e.g. X^T X of the layer's inputs X [samples, cols]).
    """
    if not isinstance(H, torch.Tensor):
        raise TypeError(f"H must be a torch.Tensor (the layer Hessian X^T X), got {type(H).__name__}")
    if H.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"H must be float32 or float64, got {H.dtype}")
    if H.shape != (cols, cols):
        raise ValueError(f"H must have shape ({cols}, {cols}) (in_features x in_features of the weight), got "
                         f"{tuple(H.shape)}")
    if H.device != device:
        raise ValueError(f"H is on {H.device} but the weight is on {device}; move them to one device")
    H64 = H.detach().to(torch.float64, copy=True)
    if not bool(torch.isfinite(H64).all()):
        raise ValueError("H contains NaN or Inf values (a calibration batch with non-finite activations?)")
    diag = H64.diagonal()
    if bool((diag < 0).any()):
        raise ValueError("H has negative diagonal entries; it must be positive semi-definite (X^T X)")
    scale = float(diag.abs().max()) if cols else 0.0
    if scale > 0 and float((H64 - H64.T).abs().max()) > SYMMETRY_RTOL * scale:
        raise ValueError("H is not symmetric; pass the Hessian X^T X of the layer's inputs")
    return (H64 + H64.T) * 0.5


def inverse_factor(H64: torch.Tensor, damp: float, perm: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The upper Cholesky factor U (dtype [cols, cols]) of (H + damp * mean(diag H) * I)^-1,
    with rows and columns in `perm` order (None: natural). Dead inputs (H_jj == 0: the channel
    was always 0 in calibration) get H_jj = 1, which decouples them: their weights are rounded
    to nearest and feed no error to the others (GPTQ also zeroes them; qengine keeps them, so
    inputs the calibration never saw still meet the original weights)."""
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp < 0:
        raise ValueError(f"damp must be a finite number >= 0 (a fraction of the mean diagonal of H), got {damp!r}")
    H = H64 if perm is None else H64[perm][:, perm]
    H = H.clone()
    diag = H.diagonal()
    diag[diag == 0] = 1.0
    diag.add_(damp * float(diag.mean()))
    # U is the inverse of the upper factor R of H = R R^T, which is the flipped lower Cholesky
    # factor of the flipped H (J H J = L L^T gives H = (J L J)(J L J)^T, J the reversal):
    # one Cholesky and one triangular inverse, several times faster here than
    # cholesky_inverse followed by a second Cholesky, with the same U.
    L, info = torch.linalg.cholesky_ex(H.flip(0, 1))
    if int(info) != 0:
        raise ValueError(f"H is not positive definite even with damping (damp={damp} of its mean diagonal): the "
                         "Cholesky factorisation failed. Increase damp (e.g. damp=0.1), or collect more calibration "
                         "samples than in_features")
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    U = torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
    return U.to(dtype)
