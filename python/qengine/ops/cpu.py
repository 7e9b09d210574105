"""The CPU kernels of every qengine op but moe_experts (cpu_moe.py), registered with
`register_kernel("cpu")` (the two small-batch products: straight into the CPU dispatch key, see
direct_cpu_kernel): checks (qengine/_checks.py), then one qengine._C call with addresses, sizes,
dtype codes and the weight as one WeightRef tuple (weight.native_weight)."""

from __future__ import annotations

import torch

from .. import _C
from .._checks import (DTYPE_CODES, check_contiguous, check_dequantize_args, check_dequantize_out_args, check_float,
                       check_float_dtype, check_matmul_args, check_matmul_t_args, check_quantize_args,
                       check_sparse_weight, check_tables)
from . import matmul as mm
from . import optim, quantize, sparse
from .weight import native_weight

# The large-batch product dequantizes this many bytes of W at a time into one buffer, which
# stays in the last-level cache between its decode and its GEMM (measured on 11008x4096, batch
# 512: 124 ms against 130 ms for the whole layer at once, and 16 MiB of scratch instead of 86).
DENSE_TILE_BYTES = 16 << 20
# The backward's dense fallback (g @ W) takes W a tile of columns at a time: never narrower than
# this, where torch's GEMM over all N input rows slows (11008x4096 at 512 rows, interleaved:
# 704-column tiles 1.09x the whole layer's time, 1024-column tiles 0.96x).
MIN_TILE_COLUMNS = 1024

# The two small-batch products (one call per layer per generated token) go straight into the
# dispatcher's CPU slot with torch.library.Library.impl instead of custom_op.register_kernel,
# whose per-call wrapper (a dynamo guard, an output-alias check) cost ~4 us of a ~38 us call
# (256x256 NF4, batch 1, inference mode: 34 us this way, 32 us with the old dispatcher bypass).
_LIB = torch.library.Library("qengine", "IMPL")


def direct_cpu_kernel(*op_names: str):
    def register(fn):
        for name in op_names:
            _LIB.impl(name, fn, "CPU")
        return fn
    return register


# --------------------------------------------------------------------------- quantize / dequantize
@quantize.quantize_blockwise.register_kernel("cpu")
def _(x, table, midpoints, sorted_to_code, grid_lut, bits, blocksize, rule, identity_order):
    check_quantize_args(x, table, midpoints, sorted_to_code, grid_lut, bits, blocksize, rule)
    packed, scales, offsets = quantize.quantize_outputs(x, bits, blocksize, rule)
    if x.numel():
        _C.quantize_cpu(x.data_ptr(), DTYPE_CODES[x.dtype], x.numel(), blocksize, table.data_ptr(),
                        midpoints.data_ptr(), sorted_to_code.data_ptr(), bits, identity_order,
                        grid_lut.data_ptr() if grid_lut is not None else 0, rule, packed.data_ptr(), scales.data_ptr(),
                        offsets.data_ptr() if rule == 1 else 0)
    return packed, scales, offsets


def dequantize_into(packed, table, scales, offsets, bits, blocksize, numel, out, stream=False) -> None:
    """Decodes into out (checked). stream=True (callers' buffers) lets large outputs bypass the
    cache; a buffer allocated just now is written through the cache, where its zeroed pages are."""
    if numel:
        _C.dequantize_cpu(native_weight(packed, table, scales, None, offsets, bits, blocksize), numel, out.data_ptr(),
                          DTYPE_CODES[out.dtype], stream)


@quantize.dequantize_blockwise.register_kernel("cpu")
def _(packed, table, scales, offsets, bits, blocksize, numel, dtype):
    check_dequantize_args(packed, table, scales, offsets, bits, blocksize, numel)
    check_float_dtype(dtype)
    out = torch.empty(numel, dtype=dtype)
    dequantize_into(packed, table, scales, offsets, bits, blocksize, numel, out)
    return out


@quantize.dequantize_blockwise_out.register_kernel("cpu")
def _(packed, table, scales, offsets, bits, blocksize, numel, out):
    check_dequantize_out_args(packed, table, scales, offsets, bits, blocksize, numel, out)
    dequantize_into(packed, table, scales, offsets, bits, blocksize, numel, out, stream=True)


def kmeans_accumulate(x: torch.Tensor, blocksize: int, table: torch.Tensor, midpoints: torch.Tensor, bits: int,
                      rule: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One weighted Lloyd step over the block-normalised values of x (CPU): per-code weighted
    sums, weight totals (weights = block scale^2) and the weighted squared error."""
    check_float("x", x)
    check_contiguous("x", x)
    if x.device.type != "cpu":
        raise ValueError(f"k-means fitting runs on the CPU; x is on {x.device}")
    check_tables(table, midpoints, None, bits, x.device)
    sums = torch.zeros(2**bits, dtype=torch.float64)
    counts = torch.zeros(2**bits, dtype=torch.float64)
    sse = _C.kmeans_accumulate_cpu(x.data_ptr(), DTYPE_CODES[x.dtype], x.numel(), blocksize, table.data_ptr(),
                                   midpoints.data_ptr(), bits, rule, sums.data_ptr(), counts.data_ptr())
    return sums, counts, sse


# --------------------------------------------------------------------------- matmul
def rounded_to(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float32 kernel output y (contiguous) in dtype, rounded natively (y itself for float32):
    torch's cast would start OpenMP workers beside the next kernel call (see small_batch_epilogue)."""
    if dtype == torch.float32:
        return y
    out = torch.empty(y.shape, dtype=dtype)
    if y.numel():
        _C.cast_float_cpu(y.data_ptr(), y.numel(), out.data_ptr(), DTYPE_CODES[dtype])
    return out


def small_batch_epilogue(xc, y, lora_a, lora_b, lora_scale):
    """After a small-batch kernel wrote y (float32 [M, N]) for x (xc, contiguous [M, K]): adds
    the LoRA side path into the same float32 output, then rounds once to x's dtype. Both
    natively: torch ops of this size would start OpenMP workers that keep spinning beside the
    next kernel call on a small machine (measured: batch-8 GEMV 13.8 -> 7.1 ms on 2 vCPUs)."""
    m, k = xc.shape
    n = y.shape[1]
    if lora_a is not None and m and n:
        af = lora_a.contiguous()
        bf = lora_b.to(af.dtype).contiguous()
        _C.lora_epilogue_cpu(xc.data_ptr(), DTYPE_CODES[xc.dtype], m, k, af.data_ptr(), bf.data_ptr(),
                             DTYPE_CODES[af.dtype], af.shape[0], n, float(lora_scale), y.data_ptr())
    return rounded_to(y, xc.dtype)


def as_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [..., k] as rows [M, k]: x itself when already 2-D (a reshape costs ~2 us of a ~20 us
    batch-1 call)."""
    return x if x.dim() == 2 else x.reshape(-1, k)


def _small_batch_product(kernel, x2, n, weight, lora_a, lora_b, lora_scale):
    """x2 [M, K] @ W^T by a fused small-batch kernel (_C.matmul_cpu, _C.sparse24_matmul_cpu) for
    W's WeightRef `weight`, into float32; then small_batch_epilogue (LoRA, x2's dtype)."""
    m, k = x2.shape
    xc = x2.contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    if m and n:
        kernel(xc.data_ptr(), DTYPE_CODES[xc.dtype], m, k, k, n, weight, y.data_ptr())
    return small_batch_epilogue(xc, y, lora_a, lora_b, lora_scale)


def _large_batch_product(x2, n, weight, lora_a, lora_b, lora_scale):
    """x2 [M, K] @ W^T by the native blocked GEMM (_C.matmul_large_cpu: W decoded panel by panel
    into the micro-kernel's layout) with the LoRA side path in its epilogue, summed in float32 and
    rounded once into x2's dtype by the kernel; None where that kernel does not apply (the
    caller's fallback)."""
    m, k = x2.shape
    xc = x2.contiguous()
    y = torch.empty(m, n, dtype=xc.dtype)  # bfloat16 wherever the kernel applies
    a = b = None
    if lora_a is not None:  # the side path in the kernel's epilogue (no torch op: see small_batch_epilogue)
        a = lora_a.contiguous()
        b = lora_b.to(a.dtype).contiguous()
    done = _C.matmul_large_cpu(xc.data_ptr(), DTYPE_CODES[xc.dtype], m, k, k, n, weight,
                               a.data_ptr() if a is not None else 0, b.data_ptr() if b is not None else 0,
                               DTYPE_CODES[a.dtype] if a is not None else 0, a.shape[0] if a is not None else 0,
                               float(lora_scale) if a is not None else 0.0, y.data_ptr(), DTYPE_CODES[y.dtype])
    return y if done else None


def _large_batch_product_t(g2, k, weight):
    """g2 [M, N] @ W by the native blocked GEMM (_C.matmul_t_large_cpu), rounded once to g2's
    dtype by the kernel; None where that kernel does not apply."""
    m, n = g2.shape
    gc = g2.contiguous()
    gx = torch.empty(m, k, dtype=gc.dtype)  # bfloat16 wherever the kernel applies
    if not _C.matmul_t_large_cpu(gc.data_ptr(), DTYPE_CODES[gc.dtype], m, n, k, weight, gx.data_ptr(),
                                 DTYPE_CODES[gx.dtype]):
        return None
    return gx


def _tiled_product(x2, n, decode_rows):
    """x2 [M, K] @ W^T for the quantized W [N, K], W dequantized into x2's dtype a tile of rows
    at a time (decode_rows(first_row, tile): rows first_row.. into the contiguous tile); each
    tile's output columns come from one GEMM over all of K."""
    m, k = x2.shape
    rows = max(1, min(n, DENSE_TILE_BYTES // max(1, k * x2.element_size())))
    tile = torch.empty(rows, k, dtype=x2.dtype)
    if rows == n:  # one tile: the GEMM writes y itself
        if k:
            decode_rows(0, tile)
        return x2 @ tile.t()
    y = torch.empty(m, n, dtype=x2.dtype)
    for first in range(0, n, rows):
        w = tile[: min(rows, n - first)]
        if k:
            decode_rows(first, w)
        y[:, first:first + w.shape[0]] = x2 @ w.t()
    return y


def _dense_rows(weight, k):
    """decode_rows for _tiled_product: rows of the dense layout, a flat range of its elements."""
    return lambda first, w: _C.dequantize_range_cpu(weight, first * k, w.numel(), w.data_ptr(), DTYPE_CODES[w.dtype])


def _add_lora_side(y, x2, lora_a, lora_b, lora_scale):
    """y + lora_scale * (x2 @ A^T) @ B^T: natively in place (_C.lora_add_cpu: one rounding, no
    float32 copies) for bfloat16 x2 and y with float32 adapters, else the torch composite."""
    if lora_a is None:
        return y
    m, k = x2.shape
    n, r = y.shape[1], lora_a.shape[0]
    if (m and x2.dtype == y.dtype == torch.bfloat16 and lora_a.dtype == lora_b.dtype == torch.float32
            and lora_a.shape == (r, k) and lora_b.shape == (n, r) and r > 0 and n > 0 and k > 0):
        xc, yc = x2.contiguous(), y.contiguous()
        a, b = lora_a.contiguous(), lora_b.contiguous()
        if _C.lora_add_cpu(xc.data_ptr(), m, k, a.data_ptr(), b.data_ptr(), r, n, float(lora_scale), yc.data_ptr(),
                           yc.data_ptr()):
            return yc
    return mm.add_lora_side(y, x2, lora_a, lora_b, lora_scale)


def _large_batch_first(m: int, sparse24: bool = False) -> bool:
    """Whether m rows go to the native large-batch kernel first: always beyond SMALL_BATCH_ROWS,
    and from the active ISA's measured crossover on (_C.gemm_min_rows: a few rows on AMX, whose
    tiles beat the small-batch GEMV there); the small-batch kernels otherwise, and wherever the
    large-batch kernel does not apply."""
    return m > mm.SMALL_BATCH_ROWS or m >= _C.gemm_min_rows(sparse24)


@direct_cpu_kernel("matmul", mm.MATMUL_NOGRAD)
def _(x, packed, table, scales, scales_nested, offsets, bits, blocksize, out_features, lora_a, lora_b, lora_scale):
    k, n = check_matmul_args(x, packed, table, scales, scales_nested, offsets, bits, blocksize, out_features, lora_a,
                             lora_b)
    x2 = as_rows(x, k)
    m = x2.shape[0]
    weight = native_weight(packed, table, scales, scales_nested, offsets, bits, blocksize)
    y = _large_batch_product(x2, n, weight, lora_a, lora_b, lora_scale) if _large_batch_first(m) else None
    if y is None and m <= mm.SMALL_BATCH_ROWS:
        y = _small_batch_product(_C.matmul_cpu, x2, n, weight, lora_a, lora_b, lora_scale)
    elif y is None:  # no native large-batch kernel for this dtype / format / shape / CPU
        y = _add_lora_side(_tiled_product(x2, n, _dense_rows(weight, k)), x2, lora_a, lora_b, lora_scale)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


@mm.matmul_t.register_kernel("cpu")
def _(g, packed, table, scales, scales_nested, offsets, bits, blocksize, in_features):
    n, k = check_matmul_t_args(g, packed, table, scales, scales_nested, offsets, bits, blocksize, in_features)
    g2 = g.reshape(-1, n)
    m = g2.shape[0]
    weight = native_weight(packed, table, scales, scales_nested, offsets, bits, blocksize)
    gx = _large_batch_product_t(g2, k, weight) if _large_batch_first(m) else None
    if gx is None and m <= mm.SMALL_BATCH_ROWS:
        gf = g2.to(torch.float32).contiguous()
        gx = torch.empty(m, k, dtype=torch.float32)
        if m and k:
            _C.matmul_t_cpu(gf.data_ptr(), m, n, k, weight, gx.data_ptr())
        gx = gx.to(g.dtype)
    elif gx is None:  # no native large-batch kernel: W dequantized for torch's GEMM
        gx = _tiled_product_t(g2, n, k, _dense_columns(weight, n, k))
    return gx.reshape(*g.shape[:-1], k)


def _tiled_product_t(g2, n, k, decode_columns, column_align=64):
    """g2 [M, N] @ W for the quantized W [N, K], W dequantized into g2's dtype: whole where it
    fits DENSE_TILE_BYTES, else a tile of columns at a time (decode_columns(k0, tile): columns
    k0.. of every row into the contiguous tile; widths multiples of column_align), every output
    column still one GEMM over all of N, so the sums are those of the whole product. A fresh
    dense copy of a large W costs page faults on every call (11008x4096 bfloat16: 13.4 ms against
    7.3 into a reused tile) and holds the whole layer in memory at once."""
    m, esize = g2.shape[0], g2.element_size()
    cols = k
    if n * k * esize > DENSE_TILE_BYTES:  # at least MIN_TILE_COLUMNS: torch's GEMM slows on narrow tiles
        cols = max(MIN_TILE_COLUMNS, DENSE_TILE_BYTES // max(1, n * esize)) // column_align * column_align
        cols = max(cols, column_align)
    tile = torch.empty(n * min(cols, k), dtype=g2.dtype)
    if cols >= k:
        w = tile.view(n, k)
        if n and k:
            decode_columns(0, w)
        return g2 @ w
    gx = torch.empty(m, k, dtype=g2.dtype)
    for k0 in range(0, k, cols):
        w = tile[: n * min(cols, k - k0)].view(n, -1)
        decode_columns(k0, w)
        gx[:, k0:k0 + w.shape[1]] = g2 @ w
    return gx


def _dense_columns(weight, n, k):
    """decode_columns for _tiled_product_t: columns of every row of the dense layout."""
    return lambda k0, w: _C.dequantize_columns_cpu(weight, n, k, k0, w.shape[1], w.data_ptr(), DTYPE_CODES[w.dtype])


@mm.lora_backward_op.register_kernel("cpu")
def _(grad, x, lora_a, lora_b, lora_scale, gx, need_a, need_b):
    """Native (_C.lora_backward_cpu) for bfloat16 grad and x with float32 adapters, the QLoRA
    training step's case; every other case, and a CPU without the kernels, runs the composite."""
    k, n, r = x.shape[-1], grad.shape[-1], lora_a.shape[0]
    native = (grad.dtype == x.dtype == torch.bfloat16 and lora_a.dtype == lora_b.dtype == torch.float32
              and (gx is None or (gx.dtype == torch.bfloat16 and gx.shape[-1] == k))
              and lora_a.shape == (r, k) and lora_b.shape == (n, r) and r > 0 and n > 0 and k > 0
              and grad.numel() // n == x.numel() // k and (gx is None or gx.numel() == x.numel()))
    if native:
        m = x.numel() // k
        g2, x2 = grad.reshape(m, n).contiguous(), x.reshape(m, k).contiguous()
        a, b = lora_a.contiguous(), lora_b.contiguous()
        gx_in = gx.reshape(m, k).contiguous() if gx is not None else None
        gx_out = torch.empty_like(gx_in) if gx is not None else x.new_empty(0)
        ga = torch.empty_like(a) if need_a else a.new_empty(0)
        gb = torch.empty_like(b) if need_b else b.new_empty(0)
        if m == 0:  # the products over no rows are zero
            ga.zero_()
            gb.zero_()
            return (gx_out.reshape(gx.shape) if gx is not None else gx_out), ga, gb
        if _C.lora_backward_cpu(g2.data_ptr(), x2.data_ptr(), m, n, k, a.data_ptr(), b.data_ptr(), r,
                                float(lora_scale), gx_in.data_ptr() if gx is not None else 0,
                                gx_out.data_ptr() if gx is not None else 0, ga.data_ptr() if need_a else 0,
                                gb.data_ptr() if need_b else 0):
            return (gx_out.reshape(gx.shape) if gx is not None else gx_out), ga, gb
    return mm.lora_backward_composite(grad, x, lora_a, lora_b, lora_scale, gx, need_a, need_b)


# --------------------------------------------------------------------------- 2:4 sparse
@sparse.sparse24_dequantize.register_kernel("cpu")
def _(packed, positions, table, scales, offsets, bits, blocksize, numel, dtype):
    check_sparse_weight(packed, positions, table, scales, None, offsets, bits, blocksize, numel)
    check_float_dtype(dtype)
    out = torch.empty(numel, dtype=dtype)
    if numel:
        _C.sparse24_dequantize_cpu(native_weight(packed, table, scales, None, offsets, bits, blocksize, positions),
                                   numel // 2, out.data_ptr(), DTYPE_CODES[dtype])
    return out


@direct_cpu_kernel("sparse24_matmul", sparse.SPARSE24_MATMUL_NOGRAD)
def _(x, packed, positions, table, scales, scales_nested, offsets, bits, blocksize, out_features, lora_a, lora_b,
      lora_scale):
    k, n = check_matmul_args(x, packed, table, scales, scales_nested, offsets, bits, blocksize, out_features, lora_a,
                             lora_b, positions)
    x2 = as_rows(x, k)
    m = x2.shape[0]
    weight = native_weight(packed, table, scales, scales_nested, offsets, bits, blocksize, positions)
    y = _large_batch_product(x2, n, weight, lora_a, lora_b, lora_scale) if _large_batch_first(m, True) else None
    if y is None and m <= mm.SMALL_BATCH_ROWS:
        y = _small_batch_product(_C.sparse24_matmul_cpu, x2, n, weight, lora_a, lora_b, lora_scale)
    elif y is None and k % SPARSE24_TILE_ALIGN == 0:  # no native large-batch kernel: W in tiles of rows
        y = _add_lora_side(_tiled_product(x2, n, _sparse24_rows(weight, n, k)), x2, lora_a, lora_b, lora_scale)
    elif y is None:  # rows that are no whole 2:4 chunks: a dense copy of W for one torch GEMM
        w = sparse.dense_sparse_weight(packed, positions, table, scales, scales_nested, offsets, bits, blocksize,
                                       n, k, x.dtype)
        y = _add_lora_side(x2 @ w.t(), x2, lora_a, lora_b, lora_scale)
        del w  # the dense copy lives only for this product
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


# The 2:4 layout's tiles are whole 256-weight chunks (csrc/cpu/sparse/sparse24.h), so rows of K
# weights tile it only when K is a multiple of 256.
SPARSE24_TILE_ALIGN = 256


def _sparse24_rows(weight, n, k):
    """decode_rows for _tiled_product: whole rows of the 2:4 layout (K % 256 == 0)."""
    return lambda first, w: _C.sparse24_dequantize_columns_cpu(weight, first, w.shape[0], n, k, 0, k, w.data_ptr(),
                                                               DTYPE_CODES[w.dtype])


def _sparse24_columns(weight, n, k):
    """decode_columns for _tiled_product_t: columns of every row of the 2:4 layout (K, k0 and
    the tile's width multiples of 256)."""
    return lambda k0, w: _C.sparse24_dequantize_columns_cpu(weight, 0, n, n, k, k0, w.shape[1], w.data_ptr(),
                                                            DTYPE_CODES[w.dtype])


@sparse.sparse24_matmul_t.register_kernel("cpu")
def _(g, packed, positions, table, scales, scales_nested, offsets, bits, blocksize, in_features):
    n, k = check_matmul_t_args(g, packed, table, scales, scales_nested, offsets, bits, blocksize, in_features,
                               positions)
    g2 = g.reshape(-1, n)
    gx = None
    if _large_batch_first(g2.shape[0], True):
        gx = _large_batch_product_t(g2, k, native_weight(packed, table, scales, scales_nested, offsets, bits,
                                                         blocksize, positions))
    if gx is None and k % SPARSE24_TILE_ALIGN == 0:  # W in tiles of columns for torch's GEMM
        weight = native_weight(packed, table, scales, scales_nested, offsets, bits, blocksize, positions)
        gx = _tiled_product_t(g2, n, k, _sparse24_columns(weight, n, k), SPARSE24_TILE_ALIGN)
    elif gx is None:  # rows that are no whole 2:4 chunks: a dense copy of W for one torch GEMM
        w = sparse.dense_sparse_weight(packed, positions, table, scales, scales_nested, offsets, bits, blocksize, n,
                                       k, g.dtype)
        gx = g2 @ w
        del w
    return gx.reshape(*g.shape[:-1], k)


# --------------------------------------------------------------------------- AdamW
def _run_adamw_tasks(tasks, hyper, state_bits, device, codes) -> None:
    code_args = (*codes[0].args(), *codes[1].args()) if codes else (0, 0, 0, 0) * 2
    encoders = (codes[0].encoder_address, codes[1].encoder_address) if codes else (0, 0)
    forms = (*codes[0].form, *codes[1].form) if codes else optim.NO_FORM * 2
    _C.adamw_cpu(tasks.data_ptr(), tasks.shape[0], hyper.data_ptr(), hyper.shape[0], state_bits, *code_args,
                 *encoders, *forms)


optim.TASK_RUNNERS["cpu"] = _run_adamw_tasks
optim.adamw_update.register_kernel("cpu")(optim.adamw_update_kernel)
