"""The quantizer of ``fp8_e4m3``: FP8 E4M3 weight-only codes, as torchao, llm-compressor and vLLM
store them (a float32 scale per block or row, the codes the bits of ``x / scale`` in E4M3).

Rule, per block of ``blocksize`` consecutive elements of the flattened tensor (a per-row block is
a row; a partial last block is padded with zeros):

- ``scale = amax / 448`` in float32 (one IEEE division; 448 = E4M3's largest value). An all-zero
  block stores scale 0.0, as every absmax format of qengine does (its codes are +-0).
- ``code = bits of E4M3(clamp(x / scale, -448, 448))``: the quotient in float32 (as the
  production libraries compute it), rounded to the nearest E4M3 value, ties to even, by torch's
  float8_e4m3fn cast (which does not saturate: hence the clamp). The sign is kept (a tiny
  negative becomes -0, code 0x80). A block whose float32 scale underflows to 0 (amax below
  448 * 2**-150) stores +-0.

Decoding is ``E4M3[code] * scale`` in float32, which is the kernels' ``values[code] * scale``
with formats.fp8_e4m3_values() as the table: bit for bit torch's
``codes.view(torch.float8_e4m3fn).float() * scale``. The NaN codes 0x7F and 0xFF are never
produced.
"""

from __future__ import annotations

import torch

from ._fit import finite_blocks

__all__ = ["E4M3_MAX", "quantize_e4m3"]

E4M3_MAX = 448.0  # (1 + 6/8) * 2**8: exponent field 15 with mantissa 111 is NaN, so 110 is the top
_CHUNK = 1 << 22  # elements per pass (bounds the float32 temporaries)


def quantize_e4m3(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3 codes and float32 block scales of x.

    Args:
        x: float32, float16 or bfloat16, any shape, finite (NaN or Inf raises ValueError).
        blocksize: elements per block (>= 1) over the flattened tensor.

    Returns:
        (codes, scales): codes uint8 [numel], one E4M3 byte per element in x's flat order;
        scales float32 [ceil(numel / blocksize)], amax / 448 of each block.
    """
    blocks = finite_blocks(x, blocksize)
    numel, nblocks = x.numel(), blocks.shape[0]
    scales = blocks.abs().amax(dim=1) / E4M3_MAX  # float32 / float32: one correctly rounded division
    codes = torch.empty(nblocks * blocksize, dtype=torch.uint8, device=x.device)
    rows = max(1, _CHUNK // blocksize)
    for b0 in range(0, nblocks, rows):
        b1 = min(nblocks, b0 + rows)
        sc = scales[b0:b1, None]
        blk = blocks[b0:b1]
        ratio = blk / torch.where(sc > 0, sc, torch.ones_like(sc))
        ratio = torch.where(sc > 0, ratio, blk * 0.0)  # scale 0: +-0, the sign kept
        e4m3 = ratio.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        codes[b0 * blocksize:b1 * blocksize] = e4m3.view(torch.uint8).reshape(-1)
    return codes[:numel].contiguous(), scales.contiguous()
