"""Block maths of the calibrated methods for the microscaling formats (mxfp4, nvfp4): the E2M1
codes of a weight exactly as qengine.microscaling's quantizer rounds them, with the block scales
restricted to the format's own scale grid (E8M0 powers of two; E4M3 times the tensor scale), so
that GPTQ and the scale search store the format's bytes and nothing else.

The methods handle a block scale as its float32 decoded value (what the kernels multiply by);
the scale codes are recovered from it when the QuantizedTensor is assembled. With a diagonal H
GPTQ stores round-to-nearest's bytes (tested), except that a weight of exactly -0.0 may be
stored +0 (the sweep's updates, even by zero, do not keep the sign of a zero): the same value.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..formats import Format
from .._fit import resolve_blocksize
from ..microscaling import block_scale_codes, e2m1_codes, microscaling_tensor, scale_values, tensor_scale_of
from ..tensor import QuantizedTensor
from ._blocks import Encoder

__all__ = ["MicroscalingEncoder", "make_encoder", "resolve_format_blocksize"]

# Scale codes tried per block by the search, as offsets from round-to-nearest's code (0 first,
# so a tie keeps it). mxfp4: one exponent down (the block's top clipped to 6 * 2**(X-1)), RTN's,
# one up. nvfp4: E4M3 steps are 1/8 to 1/16 of the scale, so -4..+6 spans about 0.6 to 1.6
# times RTN's scale; the codes above matter as much as the ones below: near 1.5 times RTN's
# scale the block's top lands on E2M1's 4 instead of 6 (a finer step between 2 and 4 times
# the scale, as in "Four Over Six" adaptive NVFP4 scaling). Measured (search_scales, blocks
# weighted by random input energy; weighted error / RTN's, Gaussian, Laplace, Student-t(3)):
# nvfp4 -8..+1 0.68 / 0.73 / 0.82 -> -4..+6 0.59 / 0.66 / 0.77 (-6..+8 the same); on the
# correlated-input 96 x 256 layer, GPTQ+search output error / RTN's 0.682 -> 0.645. mxfp4:
# -2..+2 chose -2 once in 12288 blocks and never +2.
SEARCH_OFFSETS = {"_e8m0": (0, -1, 1), "_e4m3": (0, -1, -2, -3, -4, 1, 2, 3, 4, 5, 6)}
_CHUNK_ELEMENTS = 1 << 18  # elements per candidate evaluation (bounds the float64 temporaries)


def resolve_format_blocksize(w: torch.Tensor, fmt: Format, blocksize: Optional[int]) -> tuple[int, bool]:
    """(block size, per_row) of `w` in `fmt`, as qengine.quantize reads the argument: a
    microscaling format fixes its block, so blocksize must be that block or quantize's default
    64 (meaning the format's block); other formats as resolve_blocksize."""
    if not fmt.scale_format:
        return resolve_blocksize(w, blocksize)
    if blocksize not in (fmt.fixed_blocksize, 64) or isinstance(blocksize, bool):
        raise ValueError(f"{fmt.name} fixes its block size at {fmt.fixed_blocksize} elements; got blocksize="
                         f"{blocksize!r} (pass {fmt.fixed_blocksize} or leave the default)")
    return fmt.fixed_blocksize, False


def make_encoder(fmt: Format, w: torch.Tensor) -> Encoder:
    """The Encoder of `fmt` for the weight `w` (nvfp4's tensor scale comes from w's own values)."""
    return MicroscalingEncoder(fmt, w) if fmt.scale_format else Encoder(fmt, w.device)


class MicroscalingEncoder(Encoder):
    """Encoder of mxfp4 / nvfp4: a code is the E2M1 value nearest x / scale (the quotient in
    float64, ties to even, saturating at +-6, the sign kept: -0 for a small negative), as
    quantize_microscaling rounds; a scale is one of the format's grid (decoded float32)."""

    def __init__(self, fmt: Format, w: torch.Tensor):
        # Not Encoder.__init__ (which refuses these formats): no midpoint tables, no MIN_SCALE.
        device = w.device
        self.fmt, self.minmax, self.bits, self.grid = fmt, False, fmt.bits, None
        self.table = fmt.kernel_tables(device)[0]  # float32 [16], E2M1 in storage order
        self.positive = torch.tensor(fmt.values[:8], dtype=torch.float64, device=device)
        self.zero_code = 0  # +0: the quantizer's code of 0.0 (and the padding of an odd count)
        self.tensor_scale = tensor_scale_of(w, fmt)  # float32 [1] (1.0 for mxfp4)
        self.max_code = len(self.scale_grid_values()) - 1  # E8M0 254 (255 is NaN), E4M3 126 (127 is NaN)

    def scale_grid_values(self) -> torch.Tensor:
        """float32 [codes] every block scale the format can store, in code order (non-decreasing)."""
        codes = torch.arange(255 if self.fmt.scale_format == "_e8m0" else 127, device=self.table.device)
        return scale_values(codes, self.fmt, self.tensor_scale)

    def encode(self, x: torch.Tensor, scale: torch.Tensor, offset: Optional[torch.Tensor] = None,
               partial: Optional[torch.Tensor] = None) -> torch.Tensor:
        """E2M1 storage codes (int64, x's shape) of float32 x under float32 grid scales
        (broadcastable); a zero scale stores signed zeros. offset and partial do not apply."""
        s = scale.to(torch.float64)
        ratio = x.to(torch.float64) / torch.where(s > 0, s, torch.ones_like(s))
        ratio = torch.where(s > 0, ratio, torch.copysign(torch.zeros_like(ratio), ratio))
        return e2m1_codes(ratio, self.positive)

    def decode(self, codes: torch.Tensor, scale: torch.Tensor, offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        """float32 E2M1[codes] * scale, the kernels' product."""
        return self.table.take(codes) * scale

    def block_table(self, scale: torch.Tensor, offset: Optional[torch.Tensor]) -> torch.Tensor:
        """float32 [nb, 4] per-block rows for encode_decode: only column 0, the scale, is read."""
        return torch.stack([scale] + [torch.zeros_like(scale)] * 3, dim=1)

    def encode_decode(self, x: torch.Tensor, params: torch.Tensor, partial: Optional[torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.encode(x, params[:, 0])
        return codes, self.decode(codes, params[:, 0])

    def rtn_block_params(self, x: torch.Tensor, partial: torch.Tensor) -> tuple[torch.Tensor, None]:
        """(float32 scales [nb], None): the quantizer's own grid scale of each block x [nb, bs]
        (padding repeats a real element, so max |x| is the block's)."""
        codes = block_scale_codes(x.abs().amax(dim=1), self.fmt, self.tensor_scale)
        return scale_values(codes, self.fmt, self.tensor_scale), None

    def search_block_scales(self, x: torch.Tensor, weight: torch.Tensor,
                            offsets: Sequence[int] = ()) -> torch.Tensor:
        """float32 [nb]: of the grid scales SEARCH_OFFSETS codes away from round-to-nearest's,
        the one minimising each block's weighted squared error sum weight * (x - decoded)^2
        (x, weight float32 [nb, bs]; a tie keeps the earlier offset, RTN's first)."""
        offsets = offsets or SEARCH_OFFSETS[self.fmt.scale_format]
        grid = self.scale_grid_values()
        out = []
        step = max(1, _CHUNK_ELEMENTS // max(1, x.shape[1]))
        for i in range(0, x.shape[0], step):
            xc, wc = x[i:i + step], weight[i:i + step]
            base = block_scale_codes(xc.abs().amax(dim=1), self.fmt, self.tensor_scale)
            best_err, best = None, None
            for d in offsets:
                s = grid.take((base + d).clamp(0, self.max_code))
                err = (self.decode(self.encode(xc, s[:, None]), s[:, None]) - xc).double()
                err = (err * err * wc).sum(dim=1)
                better = err < best_err if best is not None else torch.ones_like(err, dtype=torch.bool)
                best_err = torch.where(better, err, best_err) if best is not None else err
                best = torch.where(better, s, best) if best is not None else s
            out.append(best)
        return torch.cat(out)

    def scale_codes(self, scales: torch.Tensor) -> torch.Tensor:
        """int64 [nb] the codes of float32 grid scales [nb] (the lowest code of a value that
        several codes decode to, which only a subnormal nvfp4 tensor scale can cause)."""
        grid = self.scale_grid_values()
        codes = torch.searchsorted(grid, scales.contiguous(), side="left").clamp(max=self.max_code)
        if not bool((grid.take(codes) == scales).all()):
            raise AssertionError(f"{self.fmt.name}: a block scale is not on the format's scale grid")
        return codes

    def assemble_microscaling(self, codes: torch.Tensor, scales: torch.Tensor, shape: torch.Size,
                              dtype: torch.dtype) -> QuantizedTensor:
        """The QuantizedTensor of E2M1 codes (int, flat [numel]) under grid scales float32 [nb]."""
        return microscaling_tensor(codes.reshape(-1), self.scale_codes(scales), self.tensor_scale, self.fmt, shape,
                                   dtype)
