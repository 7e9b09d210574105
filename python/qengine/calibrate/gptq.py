"""GPTQ (Frantar et al., 2022): error-compensating rounding of a linear layer's weight, column
by column along the input dimension, each column's rounding error spread over the columns not
yet rounded through the upper Cholesky factor U of the damped inverse Hessian, with lazy
updates of `block_columns` columns at a time. Any qengine format, scale rule, block size and
double quantization; the result is an ordinary QuantizedTensor (RTN's layout and bytes per
parameter), so every kernel and export takes it. mxfp4 / nvfp4 keep their fixed block and
their scale grids (E8M0 powers of two; E4M3 times nvfp4's tensor scale, from the original
weights): a block's scale is the quantizer's grid scale of its updated weights (search=True:
the best of a few neighbouring grid scales), see calibrate/_microscaling.py.

    >>> H = X.T @ X                    # X [samples, in_features]: the layer's calibration inputs
    >>> q = qengine.calibrate.gptq_quantize(w, H, "nf4", blocksize=64, double_quant=True)

Scales. qengine's blocks are runs along each row (over the flat tensor), so a block's scale is
fixed when the sweep reaches the block's first column, from the block's weights as the sweep
has updated them so far (max |w|, max - min, or the searched scale with ``search=True``); later
updates may push a weight past the scale, which then takes the end code. A lazy batch ends
early at a block's first column when the block reaches past the batch, so the scale always
sees fully updated weights (never the case when K % blocksize == 0 and blocksize divides or is
a multiple of block_columns).

Double quantization stores the scales nested (8-bit codes + a mean), and the codes must be the
best for the *decoded* scales, which exist only once every scale is known. Without search, the
scales are RTN's, from the original weights, nested with qengine's own NestedScales and held
fixed during one sweep. With search=True: a first sweep fixes every block's float32 scale (and
offset) as above, those are nested, and a second sweep rounds with the decoded scales held
fixed (twice the time, for scales that fit the updated weights). Measured on a
correlated-input 96 x 256 layer (nf4, fp4, int4, uint4; blocks 32-128; 3 seeds; output error /
RTN's): scales fixed during the sweep 0.735 vs 0.742 for scales fixed beforehand from the
original weights (0.694 vs 0.727 with search=True); with double quant, two sweeps 0.7536 vs
one sweep with RTN's nested scales 0.7530 (so one sweep, at half the time), but 0.709 vs 0.723
with search=True (so two sweeps there).

act_order (columns in decreasing H_jj, the most active inputs rounded first while most other
columns can still compensate): the blocks lie along the columns, so a permuted sweep visits a
block's columns in scattered order and "the block's first column" means nothing. qengine
uses GPTQ's "static groups": every block's scale (and offset) is computed from the original
weights (or searched on them) *before* the permuted sweep, then held fixed (double quant nests
those, one sweep); codes are written back to their own positions, so the stored layout is
unchanged. Restricting the order to within each block would keep dynamic scales but give up
most of the reordering at small blocks.
"""

from __future__ import annotations

import bisect
import contextlib
from typing import Callable, Optional, Sequence

import torch

from .._checks import check_contiguous, check_float, check_positive_int
from ..formats import Format, get_format
from ..tensor import QuantizedTensor
from ._blocks import Encoder, Geometry, assemble, nest
from ._hessian import check_hessian, inverse_factor
from ._microscaling import make_encoder, resolve_format_blocksize
from .scale_search import DEFAULT_GRID, DEFAULT_REFINE, check_grid, search_block_params

__all__ = ["gptq_quantize", "gptq_quantize_experts"]

# Chooses (scale, offset) [nb] for blocks x [nb, bs] float32 with importance [nb, bs] and partial [nb].
Chooser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple]


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, format: str | Format = "nf4", blocksize: Optional[int] = 64,
                  double_quant: bool = False, damp: float = 0.01, block_columns: int = 128, act_order: bool = False,
                  search: bool = False, grid: Sequence[float] = DEFAULT_GRID,
                  compute_dtype: torch.dtype = torch.float32, factor_cache: Optional[dict] = None) -> QuantizedTensor:
    """GPTQ-rounded QuantizedTensor of a linear weight.

    Args:
        w: float32/float16/bfloat16 [out_features, in_features], contiguous, finite; not modified.
        H: float32/float64 [in_features, in_features], the layer Hessian sum_x x x^T (its scale
            does not matter), on w's device; not modified. Inputs with H_jj == 0 (never active
            in calibration) are rounded to nearest and feed no error to the others.
        format, blocksize, double_quant: as in qengine.quantize; the result has the layout and
            bits_per_param of ``qengine.quantize(w, format, blocksize, double_quant)`` (mxfp4,
            nvfp4: blocksize their block or 64, double_quant ignored, as there).
        damp: added to H's diagonal as a fraction of its mean (GPTQ's percdamp); raise it if
            the Cholesky factorisation fails (ValueError says so).
        block_columns: columns per lazy batch update (speed only; the result is the same up
            to floating-point rounding).
        act_order: round columns in decreasing H_jj with scales fixed beforehand (static groups).
        search: choose each block's scale (offset) by search_block_params, weighted by H_jj,
            instead of max|w| (max - min); grid: its clipping ratios.
        compute_dtype: float32 (default) or float64 for the sweep's arithmetic.
        factor_cache: a dict shared by calls on layers that read one input (q/k/v, gate/up):
            consecutive calls passing the very same H tensor (and damp, act_order,
            compute_dtype) check and factor it once; it holds the last factor only.
    """
    check_float("w", w)
    check_contiguous("w", w)
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"w must be a non-empty 2-D weight [out_features, in_features], got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w contains NaN or Inf values; a non-finite weight has no faithful code")
    for name, flag in (("double_quant", double_quant), ("act_order", act_order), ("search", search)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    check_positive_int("block_columns", block_columns)
    if compute_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
    grid = check_grid(grid)
    fmt = get_format(format)
    bs, per_row = resolve_format_blocksize(w, fmt, blocksize)
    double_quant = double_quant and not fmt.scale_format  # mxfp4, nvfp4: the scales are always codes
    rows, cols = w.shape
    importance, perm, U = _factor(H, cols, w.device, damp, act_order, compute_dtype, factor_cache)
    enc = make_encoder(fmt, w)
    geo = Geometry(rows, cols, bs, w.device)
    if search:
        def choose(x, weight, partial):
            return search_block_params(x, weight, partial, enc, grid, DEFAULT_REFINE)
    else:
        def choose(x, weight, partial):
            return enc.rtn_block_params(x, partial)

    W = w.detach().to(compute_dtype)
    sweep = _Sweep(geo, enc, U, block_columns, importance)
    if act_order or (double_quant and not search):
        # static: parameters from the original weights (act_order: then the permuted sweep)
        x = geo.all_blocks(w.detach().reshape(-1).to(torch.float32))
        scales, offsets = choose(x, geo.column_weights(importance), geo.partial)
    elif double_quant:  # first sweep: the scales GPTQ's updated weights call for
        with _one_thread(w.device):
            _, scales, offsets = sweep.run(W, None, choose=choose)
    else:
        with _one_thread(w.device):
            codes, scales, offsets = sweep.run(W, None, choose=choose)
        return assemble(codes, scales, offsets, enc, w.shape, w.dtype, bs, per_row)
    stored_s, stored_o = scales, offsets
    if double_quant:
        stored_s, scales = nest(scales)
        if offsets is not None:
            stored_o, offsets = nest(offsets)
    with _one_thread(w.device):
        codes, _, _ = sweep.run(W, perm, scales=scales, offsets=offsets)
    return assemble(codes, stored_s, stored_o, enc, w.shape, w.dtype, bs, per_row)


def _factor(H, cols, device, damp, act_order, compute_dtype, cache):
    """(importance float32 [cols] = diag H, column order or None, U) of a checked H, from
    `cache` when the same H tensor was factored with the same settings."""
    key = (id(H), getattr(H, "_version", None), damp, act_order, compute_dtype)
    hit = cache.get(key) if cache is not None else None
    if hit is not None and hit[0] is H:
        return hit[1:]
    H64 = check_hessian(H, cols, device)
    perm = torch.argsort(H64.diagonal(), descending=True, stable=True) if act_order else None
    out = (H64.diagonal().to(torch.float32), perm, inverse_factor(H64, damp, perm, compute_dtype))
    if cache is not None:  # one entry: layers sharing an H are quantized one after another
        cache.clear()
        cache[key] = (H,) + out
    return out


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """The sweep is thousands of small ops; on a busy CPU each one split over threads waits for
    descheduled workers (measured: 0.04 s per 96 x 256 layer on one thread, 0.1-0.5 s on two).
    The Hessian's factorisation, before it, keeps every thread."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Sweep:
    """One GPTQ pass over the columns (vectorised over rows)."""

    def __init__(self, geo: Geometry, enc: Encoder, U: torch.Tensor, block_columns: int, importance: torch.Tensor):
        self.geo, self.enc, self.U, self.batch, self.importance = geo, enc, U, block_columns, importance
        # Blocks whose scale is fixed at each column (dynamic scales), and the last column they reach.
        order = torch.argsort(geo.first_col, stable=True)
        firsts, counts = torch.unique_consecutive(geo.first_col[order], return_counts=True)
        self.events = dict(zip(firsts.tolist(), torch.split(order, counts.tolist())))
        self.event_cols = sorted(self.events)
        self.reach = {c: int(geo.last_col[ids].max()) for c, ids in self.events.items()}

    def _batch_end(self, i1: int, dynamic: bool) -> int:
        i2 = min(i1 + self.batch, self.geo.cols)
        while dynamic:  # end early at a block start whose block reaches past the batch
            lo = bisect.bisect_right(self.event_cols, i1)
            hi = bisect.bisect_left(self.event_cols, i2)
            late = [c for c in self.event_cols[lo:hi] if self.reach[c] >= i2]
            if not late:
                break
            i2 = late[0]
        return i2

    def run(self, W0: torch.Tensor, perm: Optional[torch.Tensor], choose: Optional[Chooser] = None,
            scales: Optional[torch.Tensor] = None, offsets: Optional[torch.Tensor] = None):
        """(codes uint8 [numel] in the flat layout, scales, offsets): with `choose`, each block's
        parameters are chosen at its first column (natural order only); else the given fixed
        float32 [nblocks] scales / offsets are used, in column order `perm` (None: natural).
        Works on the transposed weight, so a column and the rows a lazy update touches are
        contiguous."""
        geo, enc, U = self.geo, self.enc, self.U
        dynamic = choose is not None
        # [cols, rows] in sweep order; always a copy (a 1-row weight's transpose is contiguous).
        Wt = (W0 if perm is None else W0[:, perm]).t().clone(memory_format=torch.contiguous_format)
        cols = perm.tolist() if perm is not None else range(geo.cols)
        if dynamic:
            params = torch.zeros(geo.nblocks, 4, dtype=torch.float32, device=Wt.device)
        else:
            params = enc.block_table(scales, offsets)
        codes_t = torch.empty(geo.cols, geo.rows, dtype=torch.uint8, device=Wt.device)
        err_batch = torch.empty(self.batch, geo.rows, dtype=Wt.dtype, device=Wt.device)
        i1 = 0
        while i1 < geo.cols:
            i2 = self._batch_end(i1, dynamic)
            for i in range(i1, i2):
                if dynamic and i in self.events:
                    ids = self.events[i]
                    idx = geo.block_index(ids)
                    c_idx = idx % geo.cols
                    # take(), not advanced indexing: the index kernel starts threads for a
                    # few thousand elements, which costs ~10 ms a call on a busy machine.
                    x = Wt.view(-1).take(c_idx * geo.rows + idx // geo.cols).to(torch.float32)
                    weight = self.importance.take(c_idx) * geo.valid(idx)
                    params[ids] = enc.block_table(*choose(x, weight, geo.partial[ids]))
                c = cols[i]
                blocks = geo.block_of_column(c)
                col = Wt[i]
                q, decoded = enc.encode_decode(col.to(torch.float32), params.index_select(0, blocks),
                                               geo.partial.take(blocks) if geo.has_partial else None)
                codes_t[c] = q
                err = (col - decoded).div_(U[i, i])
                if i + 1 < i2:
                    Wt[i + 1:i2].sub_(U[i, i + 1:i2, None] * err)
                err_batch[i - i1] = err
            if i2 < geo.cols:
                Wt[i2:].addmm_(U[i1:i2, i2:].t(), err_batch[:i2 - i1], alpha=-1)
            i1 = i2
        scales = params[:, 0].contiguous()
        offsets = params[:, 1].contiguous() if enc.minmax else None
        return codes_t.t().reshape(-1), scales, offsets


def gptq_quantize_experts(w: torch.Tensor, hessians: Sequence[tuple], format: str | Format = "nf4",
                          blocksize: Optional[int] = 64, double_quant: bool = False, damp: float = 0.01,
                          act_order: bool = False, search: bool = False, gptq: bool = True) -> QuantizedTensor:
    """Mixture-of-Experts weights calibrated expert by expert, in the layout of
    ``qengine.quantize(w.reshape(E * N, K), format, blocksize, double_quant)``.

    Args:
        w: float [E, N, K] (expert e: out N x in K), each expert a whole number of blocks.
        hessians: per expert (H, rows): H float32 [K, K] = X_e^T X_e over the tokens routed to
            expert e ([K], its diagonal, suffices without gptq), or None when none was.
        search: block scales (offsets) searched, weighted by each expert's mean-square input;
            else round-to-nearest's. Either way fixed from the original weights (static, as
            act_order's) and, with double_quant, nested over all experts at once.
        gptq: then each expert's codes by a GPTQ sweep with its own H (an expert no token
            reached, H None, is rounded to nearest); else the nearest codes.
    """
    E, N, K = w.shape
    fmt = get_format(format)
    flat = w.detach().reshape(E * N, K).to(torch.float32).contiguous()
    bs, per_row = resolve_format_blocksize(flat, fmt, blocksize)
    double_quant = double_quant and not fmt.scale_format
    if (N * K) % bs:
        raise ValueError(f"blocksize {bs} does not divide one expert's {N}x{K} weight")
    enc = make_encoder(fmt, flat)
    geo = Geometry(N, K, bs, w.device)  # one expert: no partial block
    x = flat.reshape(E * geo.nblocks, bs)
    ones = torch.ones(K, device=w.device)
    imps = [ones if H is None else (H.diagonal() if H.dim() == 2 else H).to(torch.float32) / max(rows, 1)
            for H, rows in hessians]
    if search:
        found = [search_block_params(x[e * geo.nblocks:(e + 1) * geo.nblocks], geo.column_weights(imps[e]),
                                     geo.partial, enc, DEFAULT_GRID, DEFAULT_REFINE) for e in range(E)]
        scales = torch.cat([f[0] for f in found])
        offsets = torch.cat([f[1] for f in found]) if enc.minmax else None
    else:
        scales, offsets = enc.rtn_block_params(x, geo.partial.new_zeros(E * geo.nblocks))
    stored_s, stored_o = scales, offsets
    if double_quant:
        stored_s, scales = nest(scales)
        if offsets is not None:
            stored_o, offsets = nest(offsets)
    if not gptq:
        codes = enc.encode(x, scales[:, None], None if offsets is None else offsets[:, None], None).reshape(-1)
        return assemble(codes, stored_s, stored_o, enc, flat.shape, w.dtype, bs, per_row)
    codes = []
    for e, (H, _) in enumerate(hessians):
        H = torch.zeros(K, K, device=w.device) if H is None else H  # no data: decoupled, nearest codes
        importance, perm, U = _factor(H, K, w.device, damp, act_order, torch.float32, None)
        blocks = slice(e * geo.nblocks, (e + 1) * geo.nblocks)
        with _one_thread(w.device):
            c, _, _ = _Sweep(geo, enc, U, 128, importance).run(
                flat[e * N:(e + 1) * N], perm, scales=scales[blocks], offsets=None if offsets is None else offsets[blocks])
        codes.append(c)
    return assemble(torch.cat(codes), stored_s, stored_o, enc, flat.shape, w.dtype, bs, per_row)
