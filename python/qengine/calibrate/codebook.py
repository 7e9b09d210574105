"""Importance-weighted codebook fitting: 1-D k-means on the block-normalised values of a weight,
each value weighted by its block's scale^2 (so the fit minimises the error of the weights
themselves, as qengine.fit_codebook) times the energy of its input channel, so that the
table spends its values where the activations make errors cost.

    >>> fmt = qengine.calibrate.fit_codebook(w, bits=4, blocksize=64, weights=H.diagonal())
    >>> q = qengine.calibrate.gptq_quantize(w, H, fmt, blocksize=64)
"""

from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_codebook_fit
from ..formats import Format, codebook
from .._fit import quantile_init, resolve_blocksize, strictly_increasing
from ..functional import fit_codebook as _fit_unweighted
from ._blocks import Encoder, Geometry, rtn_params
from .scale_search import check_importance

__all__ = ["fit_codebook"]


def fit_codebook(weight: torch.Tensor, bits: int = 4, blocksize: Optional[int] = 64, rule: str = "absmax",
                 weights: Optional[torch.Tensor] = None, iters: int = 60, sample: int = 1 << 20, seed: int = 0,
                 tol: float = 1e-7) -> Format:
    """A codebook minimising sum_j weights_j * (w - w_hat)^2 over `weight` quantized with it
    (round-to-nearest, same blocksize and rule): weighted Lloyd iterations from the quantiles
    of a sample (qengine.fit_codebook's initialisation and clean-up, reused).

    Args:
        weight: float tensor [..., in_features] (contiguous, finite), on the CPU or any device.
        bits, blocksize, rule, iters, sample, seed, tol: as in qengine.fit_codebook.
        weights: None (then this is qengine.fit_codebook, the native path), float [in_features]
            (the importance of each input channel, >= 0, e.g. ``H.diagonal()`` or the mean of
            x^2 over calibration inputs, broadcast along the rows), or the Hessian
            [in_features, in_features] (its diagonal is used).
    """
    if weights is None:
        return _fit_unweighted(weight, bits, blocksize, rule, iters, sample, seed, tol)
    check_codebook_fit(weight, bits, rule, iters)
    if weight.dim() < 1:
        raise ValueError("cannot fit a codebook to an empty tensor")
    x = weight.detach().contiguous()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("weight contains NaN or Inf values")
    cols = x.shape[-1]
    h = check_importance(weights, cols, x.device)
    bs, _ = resolve_blocksize(x, blocksize)
    geo = Geometry(x.numel() // cols, cols, bs, x.device)
    init = quantile_init(x.cpu(), bs, rule, 2**bits, sample, seed)

    # Normalised values and their weights, once (the kernels' RTN block parameters: scale =
    # max|x| or max - min); the error of a weight is scale^2 times that of its normalised value.
    blocks = geo.all_blocks(x.reshape(-1).to(torch.float32))
    scale, offset = rtn_params(blocks, geo.partial, codebook(init, rule=rule, bits=bits))
    div = scale.clamp(min=1e-38)[:, None]
    v = ((blocks - offset[:, None]) if offset is not None else blocks) / div
    w = (geo.column_weights(h) * scale[:, None].square()).reshape(-1).double()
    v = v.reshape(-1)

    centroids = torch.tensor(init, dtype=torch.float64)
    last_sse = None
    for _ in range(iters):
        enc = Encoder(codebook(centroids.tolist(), rule=rule, bits=bits, name="kmeans"), x.device)
        idx = enc.sorted_index(v)
        n = len(enc.fmt.values)
        sums = torch.zeros(n, dtype=torch.float64, device=x.device).index_add_(0, idx, w * v.double())
        totals = torch.zeros(n, dtype=torch.float64, device=x.device).index_add_(0, idx, w)
        err = v.double() - enc.sorted_values.double()[idx]
        sse = float((w * err * err).sum())
        old = enc.sorted_values.double()
        # Empty clusters keep their value; the others move to the weighted mean of their members.
        new = torch.where(totals > 0, sums / totals.clamp(min=1e-300), old)
        centroids = strictly_increasing(new.cpu(), rule)
        if last_sse is not None and last_sse - sse <= tol * max(last_sse, 1e-30):
            break
        last_sse = sse
    return codebook(centroids.tolist(), rule=rule, bits=bits, name="codebook")
