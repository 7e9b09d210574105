"""Searched block scales: for each block, the clipped scale (and offset, minmax) that minimises
the importance-weighted squared error sum_j h_j (w_j - w_hat_j)^2 instead of the block's
absmax (max - min), with h_j the energy of input channel j (diag of the layer Hessian X^T X),
or h = 1 without calibration data.

Clipping is free in every format: a weight beyond the stored scale is simply encoded as the end
code (the nearest value), so the stored layout and the kernels are unchanged; only the stored
scale (and offset) differ from round-to-nearest's.

    >>> q = qengine.calibrate.search_scales(w, "nf4", blocksize=64, importance=H.diagonal())
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._checks import check_contiguous, check_float, check_tensor
from ..formats import Format, get_format
from ..tensor import QuantizedTensor
from ._blocks import Encoder, Geometry, assemble, nest
from ._microscaling import MicroscalingEncoder, make_encoder, resolve_format_blocksize

__all__ = ["search_scales", "search_block_params", "DEFAULT_GRID"]

# Clipping ratios tried per block, 1.0 (round-to-nearest's own scale) first so a tie keeps it:
# 1.0 down to 0.5 in steps of 0.025. Measured (nf4, fp4, int4, uint4, int8; Gaussian, Laplace
# and Student-t(3) blocks of 32, 128, 1024): extending the grid down to 0.3 changed nothing
# except Student-t blocks of 1024 in fp4/int4 (about 1% lower error).
DEFAULT_GRID = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))
# Least-squares refits of (scale, offset) to the winning codes, each kept only if it lowers the
# error. They matter for minmax (independent ends) and 8-bit tables, where the grid's 2.5% steps
# are coarse: measured error vs RTN, grid alone -> grid + 2 refits: uint4 blocks of 64 0.918 ->
# 0.882, int8 1.000 -> 0.973, uint8 1.000 -> 0.936, nf4 0.893 -> 0.881.
DEFAULT_REFINE = 2
# Blocks searched at once: bounds the temporaries to a few times this many elements.
_CHUNK_ELEMENTS = 1 << 20


def _error(x, weight, scale, offset, enc: Encoder):
    """(weighted squared error [nb], sorted code indices) of blocks x [nb, bs] coded with the
    nearest values for (scale, offset) [nb]. A fast stand-in for the kernels' rule (it always
    multiplies by the reciprocal and rounds minmax decoding twice): only the chosen parameters
    matter, and the final codes are encoded exactly (Encoder.encode) for them."""
    s = scale[:, None]
    centred = x - offset[:, None] if offset is not None else x
    idx = enc.sorted_index(centred * (1.0 / torch.where(s.abs() >= enc.min_scale, s, enc.min_scale)))
    err = enc.sorted_values.take(idx).mul_(s).sub_(centred)
    return (err.mul_(err).mul_(weight)).sum(dim=1, dtype=torch.float64), idx


def _least_squares(x, weight, idx, scale, offset, enc: Encoder):
    """(scale, offset) minimising sum w (x - t s - o)^2 for fixed codes (t = their values);
    blocks whose system is singular keep their parameters."""
    t = enc.sorted_values.take(idx).double()
    xd, wd = x.double(), weight.double()
    stt, sxt = (wd * t * t).sum(1), (wd * xd * t).sum(1)
    if offset is None:
        ok = stt > 0
        s = torch.where(ok, sxt / stt.clamp(min=1e-300), scale.double())
        return s.float(), None
    st, sw, sx = (wd * t).sum(1), wd.sum(1), (wd * xd).sum(1)
    det = stt * sw - st * st
    ok = det > 1e-12 * (stt * sw).clamp(min=1e-300)
    det = torch.where(ok, det, 1.0)
    s = torch.where(ok, (sxt * sw - st * sx) / det, scale.double())
    o = torch.where(ok, (stt * sx - st * sxt) / det, offset.double())
    return s.float(), o.float()


def search_block_params(x: torch.Tensor, weight: torch.Tensor, partial: torch.Tensor, enc: Encoder,
                        grid: Sequence[float] = DEFAULT_GRID, refine: int = DEFAULT_REFINE
                        ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Searched (scale, offset) float32 [nb] (offset None for absmax) of blocks.

    Args:
        x: float32 [nb, bs] block values (a partial block padded by repeating one of its values).
        weight: float32 [nb, bs] importance of each value, >= 0 (0 on padding).
        partial: bool [nb], the partial last block (the kernels divide there).
        enc: the format's Encoder.
        grid: clipping ratios in (0, 1]; absmax: scale = r * max|x|; minmax: the range shrinks
            by r about its centre (scale = r * (max - min), offset = min + (1 - r)/2 (max - min)).
            Ratio 1.0 is always tried (round-to-nearest's parameters), so the weighted error is
            never above round-to-nearest's (up to how the search rounds exact ties).
        refine: rounds of least-squares refit of (scale, offset) to the chosen codes.

    mxfp4 / nvfp4 (a MicroscalingEncoder): the scale stays on the format's grid, chosen among
    a few grid scales around round-to-nearest's (MicroscalingEncoder.search_block_scales);
    grid and refine do not apply.
    """
    if isinstance(enc, MicroscalingEncoder):
        return enc.search_block_scales(x, weight), None
    out_s, out_o = [], []
    step = max(1, _CHUNK_ELEMENTS // max(1, x.shape[1]))
    for i in range(0, x.shape[0], step):
        s, o = _search_chunk(x[i:i + step], weight[i:i + step], partial[i:i + step], enc, grid, refine)
        out_s.append(s)
        out_o.append(o)
    return torch.cat(out_s), (torch.cat(out_o) if enc.minmax else None)


def _search_chunk(x, weight, partial, enc, grid, refine):
    base_s, base_o = enc.rtn_block_params(x, partial)
    best_s, best_o = base_s, base_o
    best_err, codes = _error(x, weight, base_s, base_o, enc)
    for r in grid:
        if r == 1.0:
            continue
        s = base_s * r
        o = base_o + base_s * ((1.0 - r) / 2) if enc.minmax else None
        err, c = _error(x, weight, s, o, enc)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_o = torch.where(better, o, best_o) if enc.minmax else None
        codes = torch.where(better[:, None], c, codes)
    for _ in range(refine):
        s, o = _least_squares(x, weight, codes, best_s, best_o, enc)
        err, c = _error(x, weight, s, o, enc)
        better = (err < best_err) & torch.isfinite(s) & (s > 0)
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_o = torch.where(better, o, best_o) if enc.minmax else None
        codes = torch.where(better[:, None], c, codes)
    return best_s, best_o


def check_importance(importance: object, cols: int, device: torch.device) -> torch.Tensor:
    """float32 [cols] per-input-channel importance from a [cols] vector or the Hessian [cols, cols]."""
    check_tensor("importance", importance)
    if not importance.is_floating_point():
        raise TypeError(f"importance must be a floating-point tensor, got {importance.dtype}")
    if importance.dim() == 2 and importance.shape == (cols, cols):
        importance = importance.diagonal()
    if importance.shape != (cols,):
        raise ValueError(f"importance must have shape ({cols},) (one value per input channel, e.g. the diagonal of "
                         f"the layer Hessian) or ({cols}, {cols}) (the Hessian), got {tuple(importance.shape)}")
    if importance.device != device:
        raise ValueError(f"importance is on {importance.device} but the weight is on {device}")
    if not bool(torch.isfinite(importance).all()) or bool((importance < 0).any()):
        raise ValueError("importance must be finite and >= 0")
    return importance.detach().to(torch.float32)


def check_grid(grid: object) -> tuple[float, ...]:
    try:
        values = tuple(float(r) for r in grid)  # type: ignore[union-attr]
    except TypeError:
        raise TypeError(f"grid must be a sequence of clipping ratios in (0, 1], got {type(grid).__name__}") from None
    if not values or not all(0.0 < r <= 1.0 for r in values):
        raise ValueError(f"grid must be a non-empty sequence of clipping ratios in (0, 1], got {grid!r}")
    return values


def search_scales(w: torch.Tensor, format: str | Format = "nf4", blocksize: Optional[int] = 64,
                  double_quant: bool = False, importance: Optional[torch.Tensor] = None,
                  grid: Sequence[float] = DEFAULT_GRID, refine: int = DEFAULT_REFINE) -> QuantizedTensor:
    """Quantizes `w` like ``qengine.quantize(w, format, blocksize, double_quant)`` (same layout,
    bytes per parameter and kernels) with each block's scale (and offset) searched.

    Args:
        w: float32/float16/bfloat16 [..., in_features], contiguous, finite; not modified.
        format, blocksize, double_quant: as in qengine.quantize (double quantization nests
            the searched scales, then picks each code for the scale the kernels will decode;
            mxfp4 / nvfp4 fix their block and store their scale codes: see search_block_params).
        importance: None (every weight counts the same), float [in_features] (the energy of
            each input channel, e.g. ``H.diagonal()`` or the mean of x^2 over calibration
            inputs), or the Hessian [in_features, in_features] (its diagonal is used).
        grid, refine: see search_block_params.
    """
    check_float("w", w)
    check_contiguous("w", w)
    if w.dim() < 1 or w.numel() == 0:
        raise ValueError(f"w must be a non-empty tensor [..., in_features], got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w contains NaN or Inf values; a non-finite weight has no faithful code")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(f"refine must be an int >= 0, got {refine!r}")
    grid = check_grid(grid)
    fmt = get_format(format)
    bs, per_row = resolve_format_blocksize(w, fmt, blocksize)
    double_quant = double_quant and not fmt.scale_format  # mxfp4, nvfp4: the scales are always codes
    cols = w.shape[-1]
    enc = make_encoder(fmt, w)
    geo = Geometry(w.numel() // cols, cols, bs, w.device)
    h = torch.ones(cols, device=w.device) if importance is None else check_importance(importance, cols, w.device)
    x = geo.all_blocks(w.detach().reshape(-1).to(torch.float32))
    scales, offsets = search_block_params(x, geo.column_weights(h), geo.partial, enc, grid, refine)
    stored_s, stored_o = scales, offsets
    if double_quant:
        stored_s, scales = nest(scales)
        if offsets is not None:
            stored_o, offsets = nest(offsets)
    o = offsets[:, None] if offsets is not None else None
    codes = enc.encode(x, scales[:, None], o, geo.partial[:, None]).reshape(-1)[: geo.numel]
    return assemble(codes, stored_s, stored_o, enc, w.shape, w.dtype, bs, per_row)
