"""GGUF blocks <-> qengine QuantizedTensor, exactly: each GGUF block's codes and scales become
qengine codes and float32 block scales (and offsets) with integer torch ops, never through a
float weight.

The tables (registered as private formats, so saved checkpoints name them; a checkpoint that
is loaded without this module falls back to the stored codebook, which is the same table):

- ``_gguf_q4_0``: 4-bit absmax, values (q - 8) / 8, q = 0..15; scale = 8 * d (Q4_0's w = d * (q - 8)).
  d is signed in GGUF (the quantizer divides the block's signed extreme by -8), so the scale
  is too: a negative scale flips the block, decoded exactly by every kernel.
- ``_gguf_q8_0``: 8-bit absmax, values (c - 128) / 128 with c = q + 128 (Q8_0's int8 q); scale = 128 * d.
- ``_gguf_u4``: 4-bit minmax, values q / 16; Q4_1 (scale 16 * d, offset m) and Q4_K
  (per 32: scale 16 * d * sc, offset -dmin * m; 6-bit sc and m).
- ``_gguf_u5``: 8-bit minmax holding 32 values q / 32 (Q5_K's 5-bit codes, one a byte).
- ``_gguf_q6``: 8-bit absmax holding 64 values (q - 32) / 32 (Q6_K's 6-bit codes, one a byte),
  block size 16 (Q6_K's sub-block); scale = 32 * d * sc with sc Q6_K's int8 sub-block scale.
- ``_gguf_iq4_nl``: 4-bit absmax, values k / 128 with k = IQ4_NL's kvalues (-127 .. 113, sorted);
  scale = 128 * d (IQ4_NL's w = d * k).

Every product code * scale is exact in float32 (an fp16 d has 11 significant bits, a 6-bit
sub-block scale 6 (Q6_K: an int8, 7), a code at most 8 (Q6_K's q - 32: 5)), or (IQ4_NL) is
the one rounding of d * k that gguf makes too, so the decode equals gguf.quants.dequantize bit
for bit.

MXFP4 and NVFP4 go into qengine's own ``mxfp4`` / ``nvfp4`` (E2M1 codes, nested E8M0 / E4M3
scale codes): GGUF's kvalues are the E2M1 values doubled in the same code order, and its scale
halved (MXFP4: 2**(e - 128); NVFP4: ue4m3 / 2), so w = E2M1[code] * 2**(e - 127) (MXFP4) and
E2M1[code] * e4m3 (NVFP4, tensor scale 1.0: the GGUF block has none), exact in float32. The
codes and scale bytes move unchanged, except E2M1's -0 (code 8), which gguf decodes as +0:
it becomes code 0. A scale byte with no value (E8M0 0xFF; E4M3 0x7F or >= 0x80) is a
ValueError.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ...formats import Format, get_format, register_format
from ...microscaling import tensor_scale_blocksize
from ...tensor import NestedScales, QuantizedTensor

__all__ = ["EXACT_TYPES", "MICROSCALING_TYPES", "FALLBACK_TYPES", "FLOAT_TYPES", "decode_blocks", "decode_read",
           "supported_types"]

_TABLES = {
    "_gguf_q4_0": (4, tuple((q - 8) / 8 for q in range(16)), "absmax", "GGUF Q4_0 codes: (q - 8) / 8"),
    "_gguf_q8_0": (8, tuple((c - 128) / 128 for c in range(256)), "absmax", "GGUF Q8_0 codes: q / 128"),
    "_gguf_u4": (4, tuple(q / 16 for q in range(16)), "minmax", "GGUF Q4_1 / Q4_K codes: q / 16"),
    "_gguf_u5": (8, tuple(q / 32 for q in range(32)), "minmax", "GGUF Q5_K codes: q / 32, one a byte"),
    "_gguf_q6": (8, tuple((q - 32) / 32 for q in range(64)), "absmax", "GGUF Q6_K codes: (q - 32) / 32, one a byte"),
    # gguf.quants.IQ4_NL.kvalues (llama.cpp's kvalues_iq4nl), over 128: a power of two, exact.
    "_gguf_iq4_nl": (4, tuple(k / 128 for k in (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89,
                                                  113)), "absmax", "GGUF IQ4_NL codes: kvalues / 128"),
}


def _format(name: str) -> Format:
    try:
        return get_format(name)
    except ValueError:
        bits, values, rule, desc = _TABLES[name]
        return register_format(Format(name, bits, values, rule, desc))


def _f16(raw: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte `at` of each block of raw (uint8 [nblocks, type_size]), as float32."""
    return raw[:, at:at + 2].contiguous().view(torch.float16).to(torch.float32).reshape(-1)


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (uint8 [..., even]) in qengine's nibble order: element 2k high, 2k + 1 low."""
    flat = codes.reshape(-1, 2)
    return (flat[:, 0] << 4) | flat[:, 1]


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """GGUF's nibble order: within each `group` bytes, the low nibbles are the first `group`
    elements and the high nibbles the next; uint8 [nblocks, bytes] -> codes [nblocks, 2 * bytes]."""
    nb = qs.shape[0]
    g = qs.reshape(nb, -1, 1, group)
    return torch.cat([g & 0x0F, g >> 4], dim=2).reshape(nb, -1)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 6-bit sub-block scales and minima of Q4_K / Q5_K (uint8 [nblocks, 12] -> two int32
    [nblocks, 8]), unpacked as gguf.quants.Q4_K.get_scale_min does."""
    s = scales.reshape(-1, 3, 4).to(torch.int32)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _q4_0(raw):
    codes = _nibbles(raw[:, 2:], 16)
    return _pack4(codes), _f16(raw, 0) * 8, None, "_gguf_q4_0", 32


def _q8_0(raw):
    return (raw[:, 2:] ^ 0x80).reshape(-1), _f16(raw, 0) * 128, None, "_gguf_q8_0", 32


def _q4_1(raw):
    codes = _nibbles(raw[:, 4:], 16)
    return _pack4(codes), _f16(raw, 0) * 16, _f16(raw, 2), "_gguf_u4", 32


def _k_params(raw, top: int):
    d, dmin = _f16(raw, 0)[:, None], _f16(raw, 2)[:, None]
    sc, mn = _k_scale_min(raw[:, 4:16])
    # d * sc first (as gguf), then the power of two that undoes the table's 1 / top: both exact.
    scales = (d * sc.to(torch.float32)) * top
    offsets = -(dmin * mn.to(torch.float32))
    return scales.reshape(-1), offsets.reshape(-1)


def _q4_k(raw):
    codes = _nibbles(raw[:, 16:144], 32)
    scales, offsets = _k_params(raw, 16)
    return _pack4(codes), scales, offsets, "_gguf_u4", 32


def _q5_k(raw):
    nb = raw.shape[0]
    low = _nibbles(raw[:, 48:176], 32).reshape(nb, 8, 32)
    qh = raw[:, 16:48].reshape(nb, 1, 32)
    high = (qh >> torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)) & 1
    scales, offsets = _k_params(raw, 32)
    return (low | (high << 4)).reshape(-1), scales, offsets, "_gguf_u5", 32


def _q6_k(raw):
    # Block: ql (128 bytes: low nibbles), qh (64: 2-bit high parts), 16 int8 scales, fp16 d.
    nb = raw.shape[0]
    shifts = torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
    low = ((raw[:, :128].reshape(nb, 2, 1, 64) >> shifts) & 0x0F).reshape(nb, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    high = ((raw[:, 128:192].reshape(nb, 2, 1, 32) >> shifts) & 0x03).reshape(nb, 8, 32)
    sc = raw[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    # d * sc first (as gguf), then the power of two that undoes the table's 1 / 32: both exact.
    scales = (_f16(raw, 208)[:, None] * sc) * 32
    return (low | (high << 4)).reshape(-1), scales.reshape(-1), None, "_gguf_q6", 16


def _iq4_nl(raw):
    codes = _nibbles(raw[:, 2:], 16)  # Q4_0's nibble order; the code indexes the sorted kvalues
    return _pack4(codes), _f16(raw, 0) * 128, None, "_gguf_iq4_nl", 32


def _e2m1(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8) with -0 (code 8, which gguf's integer kvalues decode as +0) made +0."""
    return torch.where(codes == 8, torch.zeros_like(codes), codes)


def _mxfp4(raw):
    # Block: an E8M0 byte e, then Q4_0's nibble layout; gguf's d = 2**(e - 128) times doubled
    # E2M1 values is qengine's E8M0 code e (2**(e - 127)) times E2M1.
    e = raw[:, 0].contiguous()
    if bool((e == 0xFF).any()):
        raise ValueError("MXFP4 tensor has an E8M0 block scale byte 0xFF (NaN in OCP MX, not a scale): corrupt data")
    return _pack4(_e2m1(_nibbles(raw[:, 1:], 16))), e, None, "mxfp4", 32


def _nvfp4(raw):
    # Super-block of 64: 4 UE4M3 bytes (one per 16), then per 16 eight bytes, low nibbles the
    # first 8 elements; gguf's d = ue4m3 / 2 times doubled E2M1 values is E4M3 code times E2M1.
    nb = raw.shape[0]
    s = raw[:, :4].reshape(-1).contiguous()
    if bool((s >= 0x7F).any()):
        raise ValueError("NVFP4 tensor has a UE4M3 block scale byte 0x7F (NaN) or >= 0x80 (sign bit set), "
                         "not a scale: corrupt data")
    return _pack4(_e2m1(_nibbles(raw[:, 4:].reshape(nb * 4, 8), 8))), s, None, "nvfp4", 16


# GGML type name -> (block size in elements, bytes per block, decoder).
EXACT_TYPES = {"Q4_0": (32, 18, _q4_0), "Q8_0": (32, 34, _q8_0), "Q4_1": (32, 20, _q4_1),
               "Q4_K": (256, 144, _q4_k), "Q5_K": (256, 176, _q5_k), "Q6_K": (256, 210, _q6_k),
               "IQ4_NL": (32, 18, _iq4_nl), "MXFP4": (32, 17, _mxfp4), "NVFP4": (64, 36, _nvfp4)}
# Exact types held in a microscaling format (nested scale codes): QuantEmbedding, which gathers
# plain float32 block scales, does not take them.
MICROSCALING_TYPES = ("MXFP4", "NVFP4")
# Quantized types decoded to float (exactly, by gguf.quants.dequantize) where a Linear weight is
# kept: none today (every loadable quantized type has an exact layout); kept for future types.
FALLBACK_TYPES = ()
FLOAT_TYPES = ("F32", "F16", "BF16")


def supported_types() -> str:
    return ", ".join((*EXACT_TYPES, *(f"{t} (decoded to float)" for t in FALLBACK_TYPES), *FLOAT_TYPES))


# Bytes of a GGUF tensor decoded at a time. Small, so that a chunk's integer temporaries (a few
# times its size) are reused from the same few heap blocks: with 4 MiB chunks the allocator kept
# ~80 MiB of freed temporaries resident across a 200 MiB file (bench_gguf.py), with 256 KiB ~6,
# at about the same speed.
CHUNK_BYTES = 256 << 10


def decode_blocks(raw: torch.Tensor, type_name: str, shape: tuple[int, ...]) -> QuantizedTensor:
    """A QuantizedTensor of `shape` (torch order, [rows, cols]) from a GGUF tensor's bytes.

    raw: uint8 [nbytes] of an EXACT_TYPES tensor, row-major; cols must be a multiple of the
    type's block size (GGUF requires it)."""
    block, size, _ = EXACT_TYPES[type_name]
    expected = math.prod(shape) // block * size
    if raw.numel() != expected:
        raise ValueError(f"a {type_name} tensor of shape {list(shape)} takes {expected} bytes, got {raw.numel()}")
    return decode_read(lambda start, n: raw[start:start + n], type_name, shape)


def decode_read(read: Callable[[int, int], torch.Tensor], type_name: str,
                shape: tuple[int, ...]) -> QuantizedTensor:
    """decode_blocks from a reader: read(start, n) gives bytes start..start + n of the tensor
    (uint8 [n]). Decodes CHUNK_BYTES at a time into the preallocated codes and scales, so the
    peak beyond the result is about one chunk and its temporaries (never the whole tensor's)."""
    block, size, fn = EXACT_TYPES[type_name]
    numel = math.prod(shape)
    if not shape or shape[-1] % block:
        raise ValueError(f"a {type_name} tensor's rows must be whole {block}-element blocks, got shape {list(shape)}")
    nblocks = numel // block
    step = max(1, CHUNK_BYTES // size)
    out = None
    for b0 in range(0, nblocks, step):
        nb = min(step, nblocks - b0)
        packed, scales, offsets, fmt, bs = fn(read(b0 * size, nb * size).reshape(nb, size))
        finite = scales.dtype != torch.float32 or bool(torch.isfinite(scales).all())  # microscaling: codes
        if not (finite and (offsets is None or torch.isfinite(offsets).all())):
            raise ValueError(f"{type_name} tensor has NaN or Inf block scales (corrupt data)")
        if out is None:  # each GGUF block gives the same number of code bytes and scales
            out = [None if t is None else t.new_empty(nblocks * (t.numel() // nb)) for t in (packed, scales, offsets)]
        for dst, t in zip(out, (packed, scales, offsets)):
            if t is not None:
                per = t.numel() // nb
                dst[b0 * per:(b0 + nb) * per] = t
    packed, scales, offsets = out
    fmt = _format(fmt)
    if fmt.scale_format:  # microscaling: uint8 scale codes, nested as quantize_microscaling makes them
        scales = _nested(scales, fmt.scale_format)
    return QuantizedTensor(packed, scales, offsets, fmt, torch.Size(shape), torch.float32, bs)


def _nested(codes: torch.Tensor, scale_format: str, tensor_scale: torch.Tensor | None = None) -> NestedScales:
    """Scale codes (uint8 [nblocks]) as a microscaling weight's NestedScales: one nested block,
    absmax = the tensor scale (1.0: GGUF blocks carry none), mean 0.0."""
    n = codes.numel()
    tensor_scale = torch.ones(1, dtype=torch.float32) if tensor_scale is None else tensor_scale
    inner = QuantizedTensor(codes, tensor_scale, None, get_format(scale_format), torch.Size([n]), torch.float32,
                            tensor_scale_blocksize(n))
    return NestedScales(inner, torch.zeros((), dtype=torch.float32))


def permute_rows(q: QuantizedTensor, index: torch.Tensor) -> QuantizedTensor:
    """q with its rows reordered (row i of the result = row index[i] of q); whole rows of codes
    and their block scales / offsets move (a row is whole blocks)."""
    rows = q.shape[0]

    def take(t):
        return None if t is None else t.reshape(rows, -1)[index].reshape(-1).contiguous()

    if isinstance(q.scales, NestedScales):  # microscaling: the scale codes move, the tensor scale stays
        inner = q.scales.quantized
        scales = _nested(take(inner.packed), inner.format.name, inner.scales)
    else:
        scales = take(q.scales)
    return QuantizedTensor(take(q.packed), scales, take(q.offsets), q.format, q.shape, q.dtype, q.blocksize)
