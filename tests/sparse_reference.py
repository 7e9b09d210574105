"""A float64 reference for the 2:4 sparse layout, written from its definition only: which two
of every four weights are kept, the order they are stored in, and the dense tensor their
blockwise quantization decodes to."""

from __future__ import annotations

import torch

import reference as ref
from cases import fmt_of


def ref_keep(x: torch.Tensor) -> torch.Tensor:
    """Kept positions [groups, 2] (ascending): the 2 largest |x| of each group of 4, ties to
    the lower position (an explicit sort of (-|v|, position) pairs)."""
    g = x.reshape(-1, 4).to(torch.float64).abs().tolist()
    keep = [sorted(sorted(range(4), key=lambda i: (-row[i], i))[:2]) for row in g]
    return torch.tensor(keep, dtype=torch.int64)


def ref_storage_order(s: int) -> list[int]:
    """Natural index of each storage element: chunks of 128, e = 4i + (j ^ 1) <- v = 32j + i;
    a trailing partial chunk in natural order."""
    order = []
    full = s // 128
    for c in range(full):
        inv = [0] * 128
        for j in range(4):
            for i in range(32):
                inv[4 * i + (j ^ 1)] = 128 * c + 32 * j + i
        order += inv
    return order + list(range(full * 128, s))


def ref_sparse_dequantize(x: torch.Tensor, fmt, blocksize, double_quant, dtype, keep=None) -> torch.Tensor:
    """Dense float tensor of the 2:4 quantization of x: reference blockwise quantization of the
    kept values in storage order, scattered to their positions, zeros elsewhere."""
    k = x.shape[-1]
    keep = ref_keep(x) if keep is None else keep
    groups = x.reshape(-1, 4)
    natural = groups.gather(1, keep).reshape(-1)
    order = torch.tensor(ref_storage_order(natural.numel()), dtype=torch.int64)
    stored = natural[order]
    bs = k // 2 if blocksize is None else blocksize
    rq = ref.quantize(stored, fmt_of(fmt) if isinstance(fmt, str) else fmt, bs, double_quant)
    decoded = ref.dequantize(rq, dtype).reshape(-1)
    nat_dec = torch.empty_like(decoded)
    nat_dec[order] = decoded
    out = torch.zeros(groups.shape, dtype=dtype)
    out.scatter_(1, keep, nat_dec.reshape(-1, 2))
    return out.reshape(x.shape)
