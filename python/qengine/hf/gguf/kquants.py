"""qengine's own quantizer for GGUF's K-quants (Q4_K, Q5_K, Q6_K), which gguf.quants cannot
quantize (it only dequantizes them): llama.cpp's error-minimising searches in torch, vectorised
over super-blocks of 256 weights and run a chunk of super-blocks at a time, written as the GGML
block bytes that gguf.quants.dequantize reads.

- Q4_K / Q5_K (llama.cpp's quantize_row_q4_K_ref / q5_K_ref): per sub-block of 32, a minimum
  and a scale chosen by make_qkx2_quants (weights av_x + |x|, av_x the sub-block's RMS; 21 / 16
  candidate scales around nmax / (max - min), each refit by weighted least squares and kept if
  its weighted squared error is lower), the 8 scales and minima quantized to 6 bits against
  the super-block's fp16 d = max scale / 63 and dmin = max minimum / 63, then the codes
  recomputed with the quantized scales: w = d * sc * q - dmin * m.
- Q6_K (quantize_row_q6_K_ref): per sub-block of 16, a symmetric scale by make_qx_quants
  (weights x^2, 19 candidates around -32 / the signed extreme), the 16 scales quantized to int8
  against fp16 d = -(the signed largest scale) / 128, the codes recomputed: w = d * sc * (q - 32).

Then one step of qengine's own (_refine): each quantized sub-block scale (and minimum) is also
tried one step down and up (Q6_K: two), the codes recomputed, the least squared error kept.

Rounding is half to even (llama.cpp's nearest_int). Not byte-equal to llama.cpp (float32 sums
in another order may pick another candidate on a near tie), but the same rule."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["KQUANT_TYPES", "quantize_k", "k_fields", "pack_k"]

QK_K = 256  # weights per super-block, every K-quant
# type -> bytes per super-block (the GGML block layout gguf.quants' dequantize_blocks reads).
KQUANT_TYPES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}
# type -> (nmax, rmin, rdelta, nstep) of make_qkx2_quants, as llama.cpp's reference quantizers call it.
_QKX2 = {"q4_k": (15, -1.0, 0.1, 20), "q5_k": (31, -0.5, 0.1, 15)}
CHUNK = 2048  # super-blocks a step: ~0.5 M weights, so each [sub-blocks, 32] temporary is 2 MiB
GROUP_MAX_EPS = 1e-15  # llama.cpp: a sub-block whose largest |x| is below this is all zero


def _qkx2(x: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """make_qkx2_quants on every row of x (float32 [S, 32]): (scale [S] >= 0, minimum [S] >= 0)
    with x ~ scale * L - minimum, L in 0..nmax, minimising sum w (scale * L - minimum - x)^2."""
    w = x.square().mean(1, keepdim=True).sqrt() + x.abs()
    sum_w, sum_x = w.sum(1), (w * x).sum(1)
    mn, mx = x.amin(1).clamp(max=0), x.amax(1)
    flat = mx == mn
    rng = torch.where(flat, torch.ones_like(mx), mx - mn)
    iscale = nmax / rng
    scale = 1 / iscale
    L = torch.round(iscale[:, None] * (x - mn[:, None])).clamp(0, nmax)
    best = (w * (scale[:, None] * L + mn[:, None] - x).square()).sum(1)
    for step in range(nstep + 1):
        # As llama.cpp: the next candidate is taken around the best minimum found so far.
        iscale = (rmin + rdelta * step + nmax) / torch.where(flat, torch.ones_like(mx), mx - mn)
        L = torch.round(iscale[:, None] * (x - mn[:, None])).clamp(0, nmax)
        sum_l, sum_l2, sum_xl = (w * L).sum(1), (w * L * L).sum(1), (w * L * x).sum(1)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = (D > 0) & ~flat
        Dq = torch.where(ok, D, torch.ones_like(D))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Dq
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Dq
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sum_xl / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)), this_scale)
        err = (w * (this_scale[:, None] * L + this_min[:, None] - x).square()).sum(1)
        better = ok & (err < best)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale.clamp_min(0), (-mn).clamp_min(0)


def _fp16(v: torch.Tensor, what: str) -> torch.Tensor:
    h = v.to(torch.float16)
    if not bool(torch.isfinite(h).all()):
        raise ValueError(f"weights too large for a K-quant: the super-block {what} overflows float16 "
                         f"(largest {float(v.abs().max()):.4g} > 65504)")
    return h


def _codes(xs, dd, dm, lo, hi):
    """Nearest codes of xs [nb, J, n] on the grid dd * q - dm (dd, dm [nb, J]; q in lo..hi; q = 0
    where dd is 0) and the squared error of each sub-block [nb, J]."""
    nz = dd != 0
    q = torch.round((xs + dm[..., None]) / torch.where(nz, dd, torch.ones_like(dd))[..., None]).clamp(lo, hi)
    q = torch.where(nz[..., None], q, torch.zeros_like(q))
    return q, (dd[..., None] * q - dm[..., None] - xs).square().sum(-1)


def _refine(xs, d, sc, dmin, m, lo, hi):
    """The codes for the quantized sub-block scales sc (and minima m), each also tried one step
    down and up (Q6_K: two steps; clamped to their range) and kept where the sub-block's squared
    error is lowest: rounding a scale to the integer grid is often not the best integer.
    xs [nb, J, n] float32, d / dmin float16 [nb], sc / m float [nb, J]; returns (sc, m, q)."""
    df = d.to(torch.float32)[:, None]
    six = dmin is not None  # Q4_K / Q5_K: unsigned 6-bit sc and m; Q6_K: int8 sc, no minimum
    dmf = dmin.to(torch.float32)[:, None] if six else None
    steps = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)] if six else [(a, 0) for a in (-2, -1, 0, 1, 2)]
    best = None
    for a, b in steps:
        s2 = (sc + a).clamp(0, 63) if six else (sc + a).clamp(-128, 127)
        if not six:  # keep the sign of the sub-block's scale (0 allowed)
            s2 = torch.where(sc * s2 < 0, torch.zeros_like(s2), s2)
        m2 = (m + b).clamp(0, 63) if six else None
        # d * sc exact in float32 (11 x 6 or 7 significant bits), as gguf forms it.
        q, err = _codes(xs, df * s2, dmf * m2 if six else torch.zeros_like(s2), lo, hi)
        if best is None:
            best = [s2, m2, q, err]
            continue
        take = err < best[3]
        best[0] = torch.where(take, s2, best[0])
        best[1] = torch.where(take, m2, best[1]) if six else None
        best[2] = torch.where(take[..., None], q, best[2])
        best[3] = torch.where(take, err, best[3])
    return best[0], best[1], best[2]


def _fields_min(x: torch.Tensor, type: str) -> dict:
    nmax = _QKX2[type][0]
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    scale, mins = (t.reshape(nb, 8) for t in _qkx2(sub, *_QKX2[type]))
    max_scale, max_min = scale.amax(1, keepdim=True), mins.amax(1, keepdim=True)
    inv_scale = torch.where(max_scale > 0, 63 / max_scale, torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, 63 / max_min, torch.zeros_like(max_min))
    sc = torch.round(inv_scale * scale).clamp(0, 63)
    m = torch.round(inv_min * mins).clamp(0, 63)
    d, dmin = _fp16(max_scale[:, 0] / 63, "scale d"), _fp16(max_min[:, 0] / 63, "minimum dmin")
    sc, m, q = _refine(x.reshape(nb, 8, 32), d, sc, dmin, m, 0, nmax)
    return dict(d=d, dmin=dmin, sc=sc.to(torch.uint8), m=m.to(torch.uint8), q=q.to(torch.uint8).reshape(nb, QK_K))


def _qx(x: torch.Tensor, nmax: int = 32) -> torch.Tensor:
    """make_qx_quants(n, nmax, x, L, rmse_type=1) on every row of x (float32 [S, 16]): the signed
    scale [S] with x ~ scale * l, l in -nmax..nmax-1, maximising (sum w x l)^2 / sum w l^2, w = x^2."""
    w = x.square()
    idx = x.abs().argmax(1, keepdim=True)
    mx = x.gather(1, idx)[:, 0]
    zero = mx.abs() < GROUP_MAX_EPS
    mxq = torch.where(zero, torch.ones_like(mx), mx)

    def fit(iscale):
        ll = torch.round(iscale[:, None] * x).clamp(-nmax, nmax - 1)
        return (w * x * ll).sum(1), (w * ll * ll).sum(1)

    sumlx, suml2 = fit(-nmax / mxq)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)),
                        torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        sumlx, suml2 = fit(-(nmax + 0.1 * step) / mxq)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = torch.where(better, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)), scale)
        best = torch.where(better, scale * sumlx, best)
    return torch.where(zero, torch.zeros_like(scale), scale)


def _fields_q6(x: torch.Tensor) -> dict:
    nb = x.shape[0]
    scale = _qx(x.reshape(nb * 16, 16)).reshape(nb, 16)
    idx = scale.abs().argmax(1, keepdim=True)
    max_scale = scale.gather(1, idx)  # the signed scale of largest magnitude
    zero = max_scale.abs() < GROUP_MAX_EPS
    iscale = torch.where(zero, torch.zeros_like(max_scale), -128 / torch.where(zero, torch.ones_like(max_scale),
                                                                                max_scale))
    d = _fp16(torch.where(zero, torch.zeros_like(iscale), 1 / torch.where(zero, torch.ones_like(iscale), iscale))[:, 0],
              "scale d")
    sc = torch.round(iscale * scale).clamp(-128, 127)
    sc, _, l = _refine(x.reshape(nb, 16, 16), d, sc, None, None, -32, 31)
    return dict(d=d, sc=sc.to(torch.int8), q=(l + 32).to(torch.uint8).reshape(nb, QK_K))


def k_fields(x: torch.Tensor, type: str) -> dict:
    """The integer fields of the blocks of x (float32 [nblocks, 256], finite), before packing:
    Q4_K / Q5_K: d, dmin (float16 [nb]), sc, m (uint8 [nb, 8], 0..63), q (uint8 [nb, 256],
    0..15 / 0..31), w = d*sc[j]*q - dmin*m[j] for weight i in sub-block j = i // 32;
    Q6_K: d (float16 [nb]), sc (int8 [nb, 16]), q (uint8 [nb, 256], 0..63), w = d*sc[i // 16]*(q - 32)."""
    _check_type(type)
    return _fields_q6(x) if type == "q6_k" else _fields_min(x, type)


def _pack_scales(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Q4_K's 12 bytes of 6-bit scales and minima (uint8 [nb, 8] each, 0..63): bytes 0-3 hold sc 0-3
    and the top 2 bits of sc 4-7, bytes 4-7 m 0-3 and those of m 4-7, bytes 8-11 the low nibbles."""
    lo_s, hi_s, lo_m, hi_m = sc[:, :4], sc[:, 4:], m[:, :4], m[:, 4:]
    return torch.cat([lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_s & 0x0F) | ((hi_m & 0x0F) << 4)], 1)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [nb, 256] codes (low 4 bits used) -> [nb, 128]: sub-block 2g in the low nibbles of bytes
    32g .. 32g+31, sub-block 2g+1 in their high nibbles."""
    q = (q & 0x0F).reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _f16_bytes(h: torch.Tensor) -> torch.Tensor:
    return h.contiguous().view(torch.uint8).reshape(-1, 2)  # little endian, as GGML stores it


def pack_k(fields: dict, type: str) -> torch.Tensor:
    """The GGML block bytes (uint8 [nb, KQUANT_TYPES[type]]) of k_fields' output."""
    _check_type(type)
    q = fields["q"]
    nb = q.shape[0]
    if type == "q6_k":  # ql 128, qh 64, 16 int8 scales, fp16 d
        qq = q.reshape(nb, 2, 2, 64)  # weight 128h + 64n + l: nibble n of ql[64h + l]
        ql = ((qq[:, :, 0] & 0x0F) | ((qq[:, :, 1] & 0x0F) << 4)).reshape(nb, 128)
        hi = (q >> 4).reshape(nb, 2, 4, 32)  # weight 128h + 32s + l: bits 2s, 2s+1 of qh[32h + l]
        qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(nb, 64)
        return torch.cat([ql, qh, fields["sc"].view(torch.uint8), _f16_bytes(fields["d"])], 1)
    parts = [_f16_bytes(fields["d"]), _f16_bytes(fields["dmin"]), _pack_scales(fields["sc"], fields["m"])]
    if type == "q5_k":  # qh: bit j of byte l is the fifth bit of weight l of sub-block j
        hi = ((q >> 4) & 1).reshape(nb, 8, 32)
        qh = torch.zeros(nb, 32, dtype=torch.uint8)
        for j in range(8):
            qh |= hi[:, j] << j
        parts.append(qh)
    parts.append(_nibbles(q))
    return torch.cat(parts, 1)


def _check_type(type: str) -> None:
    if type not in KQUANT_TYPES:
        raise ValueError(f"unknown K-quant type {type!r}; one of {', '.join(KQUANT_TYPES)}")


def quantize_k(w: torch.Tensor, type: str, chunk: int = CHUNK) -> np.ndarray:
    """The GGML bytes of the 2-D float weight w ([rows, cols], cols a multiple of 256) as `type`
    (q4_k, q5_k, q6_k): numpy uint8 [rows, cols // 256 * KQUANT_TYPES[type]], the shape
    gguf.quants.quantize returns (GGUFWriter.add_tensor(..., raw_dtype=...) takes it). Runs
    `chunk` super-blocks at a time, so the temporaries stay a few MiB whatever the tensor's size.
    ValueError for another type, a row length that is not a multiple of 256, a non-finite
    weight, or one so large that a super-block factor overflows float16."""
    type = str(type).lower()
    _check_type(type)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"{type} quantizes a 2-D weight tensor, got {getattr(w, 'shape', w.__class__.__name__)}")
    rows, cols = w.shape
    if cols % QK_K or cols == 0:
        raise ValueError(f"{type} needs a row length that is a positive multiple of {QK_K}, got {cols}")
    if not w.is_floating_point():
        raise ValueError(f"{type} quantizes a float tensor, got {w.dtype}")
    size = KQUANT_TYPES[type]
    blocks = w.detach().reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], size), dtype=np.uint8)
    dst = torch.from_numpy(out)
    for start in range(0, blocks.shape[0], max(1, int(chunk))):
        x = blocks[start:start + chunk].to(device="cpu", dtype=torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{type}: the weight has a non-finite value (NaN or Inf)")
        dst[start:start + x.shape[0]] = pack_k(k_fields(x, type), type)
    return out.reshape(rows, cols // QK_K * size)
