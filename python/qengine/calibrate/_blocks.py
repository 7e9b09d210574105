"""Block maths of the calibrated methods: which block each weight belongs to, the nearest code
for given block parameters (the kernels' rule, csrc/include/qengine/quant_math.h, written in
torch so a method can choose its own scales), and the assembly of a QuantizedTensor from codes.

qengine's blocks are runs of `blocksize` over the *flat* tensor, so a weight [N, K] whose K is
not a multiple of the block size has blocks that run from the end of one row into the next;
everything here works on flat indices and does not assume K % blocksize == 0.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..formats import Format
from ..tensor import NestedScales, QuantizedTensor

MIN_SCALE = 1e-38  # the kernels' kMinScale: divisor of an all-zero block (bitsandbytes' clamp)
# Above this many value x midpoint comparisons sorted_index uses torch.bucketize (whose thread
# start-up is then amortised); below, comparing with every midpoint costs well under a ms.
_COMPARE_MAX = 1 << 20


class Encoder:
    """Nearest-code search and decoding of one format, exactly as the quantize kernel does it
    for a block of stored parameters (so RTN's own scales give RTN's own codes)."""

    def __init__(self, fmt: Format, device: torch.device):
        if fmt.quantizer:
            # The methods choose block scales and the nearest codes under them; fp8_e4m3 has
            # no block scale and its codes are the minifloat's own bits (fp8.py).
            raise ValueError(f"format {fmt.name!r} quantizes by its own scale and rounding rules; the calibrated "
                             "methods (gptq, search, codebook fitting) take codebook formats such as nf4, int4, "
                             f"int8 and the microscaling mxfp4, nvfp4: quantize {fmt.name!r} with method 'rtn'")
        if fmt.scale_format:  # mxfp4, nvfp4: scales on the format's grid (calibrate/_microscaling.py)
            raise ValueError(f"format {fmt.name!r} takes a MicroscalingEncoder (make_encoder)")
        table, mids, order, grid = fmt.kernel_tables(device)
        n = len(fmt.values)
        self.fmt = fmt
        self.minmax = fmt.rule == "minmax"
        self.table = table  # float32 [2**bits], storage order
        self.real_mids = mids[: n - 1].contiguous()  # float32 sorted midpoints
        self.bits = fmt.bits
        self.order = order[:n].long()  # storage code of each sorted value
        self.sorted_values = table[self.order]  # float32 [n], ascending
        self.identity = fmt.identity_order
        self.grid = grid.long() if grid is not None else None
        self.min_scale = torch.tensor(MIN_SCALE, dtype=torch.float32, device=device)
        self.zero_code = int(self.encode(torch.zeros(1, device=device), torch.ones(1, device=device),
                                         torch.zeros(1, device=device), torch.zeros(1, dtype=torch.bool,
                                                                                    device=device))[0])

    def encode(self, x: torch.Tensor, scale: torch.Tensor, offset: Optional[torch.Tensor],
               partial: Optional[torch.Tensor]) -> torch.Tensor:
        """Storage codes (int64, x's shape) of float32 `x` in blocks of the given float32 `scale`,
        `offset` (minmax; ignored for absmax) and `partial` (bool: the last, partial block,
        which the kernels divide instead of multiplying by the reciprocal; None: no partial
        block among them); all broadcastable."""
        if self.grid is not None:  # bitsandbytes' grid rule (dynamic8): x * (1 / absmax) on 65536 points
            v = (x * (1.0 / scale)).clamp(-1.0, 1.0)
            k = (((v + 1.0) * 0.5) * 65535.0 + 0.5).to(torch.int64).clamp(0, 65535)
            return torch.where(scale == 0, 0, self.grid.take(k))
        # div = max(scale, MIN_SCALE) as the kernels; a negative scale (a double-quantized one
        # can decode below zero) is kept, since the nearest code of (x - offset) / scale is then
        # still the nearest decoded value.
        div = torch.where(scale.abs() >= self.min_scale, scale, self.min_scale)
        centred = x - offset if self.minmax else x
        v = centred * (1.0 / div)
        if partial is not None:
            v = torch.where(partial, centred / div, v)
        return self.order.take(self.sorted_index(v))

    def block_table(self, scale: torch.Tensor, offset: Optional[torch.Tensor]) -> torch.Tensor:
        """float32 [nb, 4] per-block (scale, offset, 1 / div, div) for encode_decode, where div
        is the kernels' divisor max(scale, MIN_SCALE) (a negative scale kept, see encode)."""
        div = torch.where(scale.abs() >= self.min_scale, scale, self.min_scale)
        off = offset if offset is not None else torch.zeros_like(scale)
        return torch.stack([scale, off, 1.0 / div, div], dim=1)

    def encode_decode(self, x: torch.Tensor, params: torch.Tensor, partial: Optional[torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(storage codes int64 [n], their float32 values) of float32 x [n] whose blocks'
        block_table rows are `params` [n, 4]: encode then decode, in fewer operations (the
        sweep calls this once per column)."""
        if self.grid is not None:
            scale, offset = params[:, 0], params[:, 1] if self.minmax else None
            codes = self.encode(x, scale, offset, partial)
            return codes, self.decode(codes, scale, offset)
        centred = x - params[:, 1] if self.minmax else x
        v = centred * params[:, 2]
        if partial is not None:
            v = torch.where(partial, centred / params[:, 3], v)
        idx = self.sorted_index(v)
        codes = idx if self.identity else self.order.take(idx)
        t = self.sorted_values.take(idx)
        if self.minmax:
            return codes, (t.double() * params[:, 0].double() + params[:, 1].double()).float()
        return codes, t * params[:, 0]

    def rtn_block_params(self, x: torch.Tensor, partial: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Round-to-nearest's (scale, offset) of blocks x [nb, bs]: see rtn_params."""
        return rtn_params(x, partial, self.fmt)

    def sorted_index(self, v: torch.Tensor) -> torch.Tensor:
        """Number of midpoints strictly below float32 v (ties go to the lower code), int64.
        torch.bucketize computes it, but wakes its worker threads even for a few thousand
        values, which cost milliseconds a call on a busy 2-core machine (measured); the sweep's
        per-column calls (one value per row) count with one comparison per midpoint instead."""
        if v.numel() * len(self.real_mids) > _COMPARE_MAX:
            return torch.bucketize(v, self.real_mids, right=False)
        return (v.unsqueeze(-1) > self.real_mids).sum(-1)

    def decode(self, codes: torch.Tensor, scale: torch.Tensor, offset: Optional[torch.Tensor]) -> torch.Tensor:
        """float32 values of `codes` (the kernels' table[q] * scale, + offset in one rounding for
        minmax: the float64 product is exact; the float64 sum may differ from the fused one by
        one float32 ulp in rare cases, which only affects the error feedback, never the codes
        stored: QuantizedTensor.dequantize gives the stored values)."""
        t = self.table.take(codes)
        if not self.minmax:
            return t * scale
        return (t.double() * scale.double() + offset.double()).float()


class Geometry:
    """Blocks of a weight [rows, cols] quantized in runs of `blocksize` over its flat layout."""

    def __init__(self, rows: int, cols: int, blocksize: int, device: torch.device):
        self.rows, self.cols, self.blocksize = rows, cols, blocksize
        self.numel = rows * cols
        self.nblocks = -(-self.numel // blocksize)
        self.row_base = torch.arange(rows, device=device) * cols
        self.partial = torch.zeros(self.nblocks, dtype=torch.bool, device=device)
        self.has_partial = self.numel % blocksize != 0
        if self.has_partial:
            self.partial[-1] = True
        starts = torch.arange(self.nblocks, device=device) * blocksize
        ends = torch.clamp(starts + blocksize, max=self.numel)  # exclusive
        spans = starts // cols != (ends - 1) // cols  # runs past the end of a row into the next
        # First and last column each block touches: a block crossing a row boundary holds
        # column 0 of the next row and column cols-1 of the previous one.
        self.first_col = torch.where(spans, 0, starts % cols)
        self.last_col = torch.where(spans, cols - 1, (ends - 1) % cols)
        self.device = device

    def block_of_column(self, col: int) -> torch.Tensor:
        """Block index (int64 [rows]) of each row's weight in column `col`."""
        return (self.row_base + col) // self.blocksize

    def block_index(self, blocks: torch.Tensor) -> torch.Tensor:
        """Flat indices [len(blocks), blocksize] of the listed blocks' elements; the partial
        block's missing tail repeats its first element (which changes neither its absmax nor
        its min and max; callers weight those slots 0, see valid)."""
        idx = blocks[:, None] * self.blocksize + torch.arange(self.blocksize, device=self.device)
        return torch.where(idx < self.numel, idx, idx[:, :1])

    def all_blocks(self, flat: torch.Tensor) -> torch.Tensor:
        """Every block of `flat` [numel] as [nblocks, blocksize] (padded as in block_index)."""
        pad = self.nblocks * self.blocksize - self.numel
        if pad:
            flat = torch.cat([flat, flat[(self.nblocks - 1) * self.blocksize].expand(pad)])
        return flat.reshape(self.nblocks, self.blocksize)

    def column_weights(self, importance: torch.Tensor) -> torch.Tensor:
        """Per-input-channel importance [cols] spread over every block [nblocks, blocksize]
        (0 on the partial block's padding)."""
        pad = self.nblocks * self.blocksize - self.numel
        per_elem = importance.to(torch.float32).repeat(self.rows)
        return torch.cat([per_elem, per_elem.new_zeros(pad)]).reshape(self.nblocks, self.blocksize)

    def valid(self, idx: torch.Tensor) -> torch.Tensor:
        """True where a gathered slot is a real element (False on the partial block's padding)."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        return (idx - idx[:, :1]) == pos


def rtn_params(x: torch.Tensor, partial: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The kernels' block parameters of float32 blocks x [nb, bs] (padding repeats a real
    element): absmax scale = max|x| (a partial block stores max(absmax, MIN_SCALE), as
    bitsandbytes, except under the grid rule), or minmax scale = max - min, offset = min."""
    if fmt.rule == "minmax":
        lo, hi = x.amin(dim=1), x.amax(dim=1)
        return hi - lo, lo
    a = x.abs().amax(dim=1)
    if fmt.search == "grid":
        return a, None
    return torch.where(partial, a.clamp(min=MIN_SCALE), a), None


def nest(values: torch.Tensor) -> tuple[NestedScales, torch.Tensor]:
    """Double quantization of per-block values through qengine's own NestedScales: (the nested
    state stored, the float32 values it decodes to, which the kernels use)."""
    nested = NestedScales.from_values(values.contiguous())
    return nested, nested.values()


def assemble(codes: torch.Tensor, scales, offsets, enc: Encoder, shape: torch.Size, dtype: torch.dtype,
             blocksize: int, per_row: bool) -> QuantizedTensor:
    """A QuantizedTensor from storage codes (int, flat [numel] in the tensor's layout), block
    scales and offsets (float32 [nblocks] or NestedScales): codes packed as the kernels pack
    them (4 bits: code 2k in the high nibble of byte k, an odd count padded with the code of 0.0).
    Microscaling formats: float32 grid scales, stored as the format's scale codes."""
    if enc.fmt.scale_format:  # mxfp4, nvfp4: the scales become the format's nested scale codes
        return enc.assemble_microscaling(codes, scales, shape, dtype)
    codes = codes.reshape(-1).to(torch.uint8)
    if enc.fmt.bits == 4:
        if codes.numel() % 2:
            codes = torch.cat([codes, codes.new_full((1,), enc.zero_code)])
        packed = (codes[0::2] << 4) | codes[1::2]
    else:
        packed = codes.clone()
    return QuantizedTensor(packed.contiguous(), scales, offsets if enc.minmax else None, enc.fmt, shape, dtype,
                           blocksize, per_row)
