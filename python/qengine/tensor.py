"""QuantizedTensor: the packed codes of a tensor plus everything needed to decode them, and
its flat state dict (tensors only, so it round-trips through torch.save and safetensors)."""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _layouts
from ._checks import FLOAT_DTYPES, check_contiguous, check_float, check_same_device
from ._state_dict import (DTYPE_NAMES, LAYOUTS, STATE_VERSION, check_codes, get_tensor, json_tensor, parse_meta,
                          read_positions)
from .formats import Format, get_format
from .fp8 import quantize_e4m3
from .ops import KernelWeight

__all__ = ["QuantizedTensor", "NestedScales", "PackedParameter"]

# Double quantization quantizes the per-block scales again, blockwise, as QLoRA does.
# NESTED_FORMAT is the default nested table; the microscaling formats' scale bytes are nested
# codes of their own tables (Format.scale_format): the inner QuantizedTensor's format says which.
NESTED_FORMAT = "dynamic8"
NESTED_BLOCKSIZE = 256



class PackedParameter(torch.nn.Parameter):
    """The packed codes of a quantized weight (QuantLinear.weight_packed): a frozen integer
    nn.Parameter (a parameter, so FSDP2 shards it with the others), which cannot require grad.
    torch would refuse too, but with "only Tensors of floating point dtype can require
    gradients" and no name; ``model.requires_grad_(True)`` on a quantized model reaches this
    one first and is told what to do instead. requires_grad_(False) is accepted."""

    def __new__(cls, data: torch.Tensor, requires_grad: bool = False):
        if requires_grad:
            _refuse_grad(data)
        if isinstance(data, torch.nn.Parameter):  # re-wrapping a parameter (e.g. packed codes re-stored): its data
            data = data.detach()
        return super().__new__(cls, data, requires_grad=False)

    def requires_grad_(self, requires_grad: bool = True) -> "PackedParameter":
        if requires_grad:
            _refuse_grad(self)
        return super().requires_grad_(False)

    def __reduce_ex__(self, proto):  # pickling keeps the class (torch's rebuilds a plain Parameter)
        return (PackedParameter, (self.data,))


def _refuse_grad(t: torch.Tensor) -> None:
    raise RuntimeError(f"qengine: weight_packed (the packed {t.dtype} codes [{t.numel()}] of a QuantLinear's quantized "
                       "weight) cannot require grad: a quantized weight is frozen. To fine-tune, add LoRA adapters "
                       "(qengine.add_lora(model), which calls qengine.mark_only_lora_trainable(model)), or set "
                       "requires_grad on floating-point parameters only: for p in model.parameters(): "
                       "p.requires_grad_(p.is_floating_point())")


class NestedScales:
    """Per-block float32 scales (or offsets) stored double-quantized:
    ``values ~= dequantize(quantized) + mean`` with ``quantized`` a dynamic8, block-256
    QuantizedTensor of ``values - mean``."""

    def __init__(self, quantized: "QuantizedTensor", mean: torch.Tensor):
        self.quantized = quantized
        self.mean = mean

    @classmethod
    def from_values(cls, values: torch.Tensor) -> "NestedScales":
        # The mean is taken on the CPU whatever the device: torch's float32 reductions sum in a
        # device-specific order, and CUDA quantization must store the CPU's bytes.
        mean = values.mean() if values.device.type == "cpu" else values.cpu().mean().to(values.device)
        centred = values - mean
        # Finite weights near the float32 limit can overflow the float32 mean (or the centred
        # values); say so rather than let the nested kernel report a "NaN or Inf" input.
        if not torch.isfinite(centred).all():
            raise ValueError("double quantization: the mean of the block scales (or offsets) overflows float32 "
                             "(weights too close to the float32 limit); quantize with double_quant=False")
        return cls(QuantizedTensor._quantize_flat(centred, get_format(NESTED_FORMAT), NESTED_BLOCKSIZE), mean)

    def values(self) -> torch.Tensor:
        v = self.quantized.dequantize(torch.float32)
        return v + self.checked_mean()

    def checked_mean(self) -> torch.Tensor:
        """The mean, after checking it is still one element (it may have been replaced since)."""
        if not isinstance(self.mean, torch.Tensor) or self.mean.numel() != 1:
            got = tuple(self.mean.shape) if isinstance(self.mean, torch.Tensor) else type(self.mean).__name__
            raise ValueError(f"the nested scales' mean must be a one-element tensor, got {got}")
        return self.mean

    @property
    def nbytes(self) -> int:
        inner = self.quantized
        if not inner.format.stored_table:
            # A microscaling scale encoding: the codes, and the float32 tensor scale of E4M3 (E8M0's
            # absmax 1.0 and both means 0.0 are constants of the format, not data).
            return inner.packed.numel() + (4 * inner.scales.numel() if inner.format.name == "_e4m3" else 0)
        return inner.nbytes + self.mean.numel() * self.mean.element_size()

    def to(self, device) -> "NestedScales":
        return NestedScales(self.quantized.to(device), self.mean.to(device))


class QuantizedTensor:
    """A blockwise-quantized tensor.

    Attributes:
        packed: uint8 [ceil(numel * bits / 8)], codes in bitsandbytes' nibble order (element
            2k in the high nibble of byte k) or one per byte for 8-bit formats.
        scales: float32 [nblocks], or NestedScales when double-quantized.
        offsets: float32 [nblocks] (or NestedScales) for minmax formats, else None.
        format: the Format (codebook + rule); shape, dtype: of the original tensor;
        blocksize: elements per block (the row length for per-row quantization); in the 2:4
            layout, stored values per block.
        layout: "dense", or "2:4": every group of 4 consecutive weights along the last dimension
            keeps 2; packed/scales/offsets then describe the numel / 2 kept values (in the
            layout's storage order, see _layouts.py) and positions holds their 2-bit positions,
            uint8 [ceil(numel / 8)].
        mask: None, or uint8 [ceil(numel / 8)]: a pruning mask (bit i % 8 of byte i // 8, 1 =
            kept) stored for formats whose table has no exact zero, applied on dequantization
            so pruned weights decode to exactly 0.0 (see quantize(mask=...)).
    """

    # Class-level defaults: objects pickled before these attributes existed load as dense.
    layout = "dense"
    positions = None
    mask = None

    def __init__(self, packed: torch.Tensor, scales, offsets, fmt: Format, shape: torch.Size, dtype: torch.dtype,
                 blocksize: int, per_row: bool = False, layout: str = "dense",
                 positions: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None):
        self.packed = packed
        self.scales = scales
        self.offsets = offsets
        self.format = fmt
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.blocksize = blocksize
        self.per_row = per_row
        self.layout = layout
        self.positions = positions
        self.mask = mask

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _quantize_flat(x: torch.Tensor, fmt: Format, blocksize: int) -> "QuantizedTensor":
        if fmt.quantizer == "e4m3":  # fp8_e4m3: the codes are E4M3 bits (fp8.py), decoded by every kernel
            packed, scales = quantize_e4m3(x, blocksize)
            return QuantizedTensor(packed, scales, None, fmt, x.shape, x.dtype, blocksize)
        table, mids, order, grid = fmt.kernel_tables(x.device)
        packed, scales, offsets = torch.ops.qengine.quantize_blockwise(
            x.reshape(-1), table, mids, order, grid, fmt.bits, blocksize, fmt.rule_code, fmt.identity_order)
        return QuantizedTensor(packed, scales, offsets if fmt.rule == "minmax" else None, fmt, x.shape, x.dtype,
                               blocksize)

    # ------------------------------------------------------------------ properties
    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def double_quant(self) -> bool:
        return isinstance(self.scales, NestedScales)

    @property
    def stored_numel(self) -> int:
        """Quantized values stored: numel, or numel / 2 in the 2:4 layout."""
        return self.numel // 2 if self.layout == "2:4" else self.numel

    @property
    def nblocks(self) -> int:
        return -(-self.stored_numel // self.blocksize)

    @property
    def nbytes(self) -> int:
        """Bytes of everything stored: packed codes, scales (nested or not), offsets, codebooks."""
        total = self.packed.numel() + (4 * len(self.format.values) if self.format.stored_table else 0)
        for extra in (self.positions, self.mask):
            total += extra.numel() if extra is not None else 0
        for part in (self.scales, self.offsets):
            if isinstance(part, NestedScales):
                total += part.nbytes
            elif part is not None:
                total += part.numel() * part.element_size()
        return total

    @property
    def bits_per_param(self) -> float:
        """Storage cost in bits per element, counting every stored byte."""
        return 8.0 * self.nbytes / max(self.numel, 1)

    def kernel_weight(self) -> KernelWeight:
        """The weight as the kernels take it (2-D [N, K]; shares this tensor's storage):
        double-quantized scales stay uint8 codes decoded in the kernel, offsets are decoded."""
        n, k = (self.shape[0], math.prod(self.shape[1:])) if len(self.shape) else (1, 1)
        scales, nested = self.scales, []
        if isinstance(scales, NestedScales):
            inner = scales.quantized
            nested = KernelWeight.nested_parts(inner.format.kernel_tables(self.device)[0], inner.scales,
                                               scales.checked_mean(), inner.blocksize)
            scales = inner.packed
        return KernelWeight(self.packed, self.format.kernel_tables(self.device)[0], self.format.bits, self.blocksize,
                            scales, nested, self._block_values(self.offsets), (n, k), self.layout, self.positions)

    def _kernel_scales(self) -> tuple[torch.Tensor, Optional[list]]:
        """(scales, nested or None) of kernel_weight(), for the tests that call the ops directly."""
        kw = self.kernel_weight()
        return kw.scales, (kw.nested or None)

    def _block_values(self, part) -> Optional[torch.Tensor]:
        if isinstance(part, NestedScales):
            return part.values()
        return part

    # ------------------------------------------------------------------ decoding
    def dequantize(self, dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The dense tensor (shape self.shape) in `dtype` (default: the original dtype), or
        written into `out` (contiguous, same shape, a float dtype, same device) and returned.
        As torch's in-place ops, `out` may not require grad while grad mode is on (RuntimeError,
        `out` unchanged): the write is not recorded by autograd. Under torch.no_grad() (e.g. to
        initialise a parameter) it is allowed."""
        if out is not None and isinstance(out, torch.Tensor) and out.requires_grad and torch.is_grad_enabled():
            what = "a leaf Variable that requires grad" if out.is_leaf else "a tensor that requires grad"
            raise RuntimeError(f"dequantize(out=...): out is {what} and would be written in place outside autograd "
                               "(torch: 'a leaf Variable that requires grad is being used in an in-place "
                               "operation'); write into out.detach() or under torch.no_grad(), or call "
                               "dequantize() without out=")
        fmt = self.format
        table = fmt.kernel_tables(self.device)[0]
        scales = self._block_values(self.scales)
        offsets = self._block_values(self.offsets)
        if out is not None:
            if dtype is not None and dtype != out.dtype:
                raise ValueError(f"dtype={dtype} conflicts with out.dtype={out.dtype}")
            check_float("out", out)
            if out.shape != self.shape:
                raise ValueError(f"out must have shape {tuple(self.shape)}, got {tuple(out.shape)}")
            check_contiguous("out", out)
            check_same_device(self.device, out=out)
            if self.layout == "dense" and self.mask is None:
                torch.ops.qengine.dequantize_blockwise_out(self.packed, table, scales, offsets, fmt.bits,
                                                           self.blocksize, self.numel, out)
            else:
                out.copy_(self._decode(table, scales, offsets, out.dtype))
            return out
        dtype = self.dtype if dtype is None else dtype
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        return self._decode(table, scales, offsets, dtype)

    def _decode(self, table, scales, offsets, dtype) -> torch.Tensor:
        bits = self.format.bits
        if self.layout == "2:4":
            flat = torch.ops.qengine.sparse24_dequantize(self.packed, self.positions, table, scales, offsets, bits,
                                                         self.blocksize, self.numel, dtype)
        else:
            flat = torch.ops.qengine.dequantize_blockwise(self.packed, table, scales, offsets, bits, self.blocksize,
                                                          self.numel, dtype)
        if self.mask is not None:  # pruned weights of a format without an exact zero
            mask = self.mask  # replaced since quantization? a wrong size would mask the wrong weights
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.uint8 or mask.numel() != -(-self.numel // 8):
                raise ValueError(f"mask must be uint8 [{-(-self.numel // 8)}] for a tensor of shape "
                                 f"{tuple(self.shape)}, got {getattr(mask, 'dtype', type(mask).__name__)} "
                                 f"{tuple(getattr(mask, 'shape', ()))}")
            flat = flat.masked_fill(~_layouts.unpack_mask(mask, self.numel), 0.0)
        return flat.reshape(self.shape)

    # ------------------------------------------------------------------ movement
    def to(self, device) -> "QuantizedTensor":
        """A copy on `device` (a torch.device, "cuda:0", or a CUDA index; the same object when
        already there); never re-quantizes. Only devices: the stored codes and scales have fixed
        dtypes, so a dtype raises TypeError (for a dense tensor use ``dequantize(dtype=...)``;
        qengine.matmul computes in x's dtype, QuantLinear in its ``compute_dtype``)."""
        if isinstance(device, torch.dtype):
            raise TypeError(f"QuantizedTensor.to() moves between devices only; it cannot cast to {device} (the packed "
                            f"codes and block scales keep their storage dtypes). For a dense {device} tensor use "
                            f"q.dequantize(dtype={device}); qengine.matmul computes in x's dtype (QuantLinear: in its "
                            "compute_dtype)")
        try:
            device = torch.device(device)
        except (TypeError, RuntimeError) as e:
            raise TypeError(f"QuantizedTensor.to() takes a device (torch.device, str or CUDA index), got "
                            f"{device!r}: {e}") from None
        if device == self.device:
            return self

        def move(part):
            if part is None:
                return None
            return part.to(device)

        return QuantizedTensor(self.packed.to(device), move(self.scales), move(self.offsets), self.format, self.shape,
                               self.dtype, self.blocksize, self.per_row, self.layout, move(self.positions),
                               move(self.mask))

    def cpu(self) -> "QuantizedTensor":
        return self.to("cpu")

    def cuda(self, device=None) -> "QuantizedTensor":
        return self.to(torch.device("cuda") if device is None else torch.device("cuda", device)
                       if isinstance(device, int) else torch.device(device))

    def __repr__(self) -> str:
        return (f"QuantizedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, format={self.format.name}, "
                f"blocksize={'row' if self.per_row else self.blocksize}, double_quant={self.double_quant}, "
                f"{'layout=2:4, ' if self.layout == '2:4' else ''}{'masked, ' if self.mask is not None else ''}"
                f"bits_per_param={self.bits_per_param:.3f}, device={self.device})")

    # ------------------------------------------------------------------ state dict
    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flat dict of tensors: packed, scales/offsets (or their nested parts), codebook and
        a uint8 tensor holding the JSON metadata (format, shape, dtype, blocksize, version)."""
        meta = {
            "version": STATE_VERSION,
            "format": self.format.to_dict(),
            "shape": list(self.shape),
            "dtype": DTYPE_NAMES[self.dtype],
            "blocksize": self.blocksize,
            "per_row": self.per_row,
            "double_quant": self.double_quant,
        }
        if self.layout != "dense":  # dense state dicts stay byte-identical to earlier versions
            meta["layout"] = self.layout
        sd = {
            prefix + "packed": self.packed,
            prefix + "codebook": torch.tensor(self.format.values, dtype=torch.float32, device=self.device),
            prefix + "quant_meta": json_tensor(meta, self.device),
        }
        if self.positions is not None:
            sd[prefix + "positions"] = self.positions
        if self.mask is not None:
            sd[prefix + "mask"] = self.mask
        for name, part in (("scales", self.scales), ("offsets", self.offsets)):
            if isinstance(part, NestedScales):
                sd.update(part.quantized.state_dict(prefix + f"{name}.nested."))
                sd[prefix + f"{name}.mean"] = part.mean
            elif part is not None:
                sd[prefix + name] = part
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str = "") -> "QuantizedTensor":
        """Rebuilds a QuantizedTensor from state_dict() output; every size, dtype and code is
        checked, and a corrupt or mismatched dict raises ValueError naming the key."""
        meta, shape, dtype, blocksize, fmt, layout = parse_meta(sd, prefix)
        bits, rule, numel = fmt.bits, fmt.rule, math.prod(shape)
        mask = None
        stored = numel // 2 if layout == "2:4" else numel
        positions = read_positions(sd, prefix, shape) if layout == "2:4" else None
        if prefix + "mask" in sd:
            mask = get_tensor(sd, prefix + "mask", torch.uint8, -(-numel // 8))
        nblocks = -(-stored // blocksize)
        packed = get_tensor(sd, prefix + "packed", torch.uint8, -(-stored * bits // 8))
        scales = _read_block_part(sd, prefix + "scales", nblocks, required=True, fmt=fmt)
        offsets = _read_block_part(sd, prefix + "offsets", nblocks, required=rule == "minmax", fmt=fmt)
        q = cls(packed.contiguous(), scales, offsets, fmt, shape, dtype, blocksize, bool(meta.get("per_row", False)),
                layout, positions, mask)
        check_codes(q.packed, fmt, stored, prefix)
        if fmt.invalid_codes and bool(torch.isin(q.packed, torch.tensor(fmt.invalid_codes, device=q.device)).any()):
            raise ValueError(f"{prefix}packed contains {fmt.name} codes with no value "
                             f"({', '.join(f'0x{c:02X}' for c in fmt.invalid_codes)}: NaN; corrupt data)")
        # Negative float32 block scales are data, not corruption: a GGUF Q4_0/Q8_0 block's
        # scale d is signed (qengine.hf.load_gguf keeps it), and the kernels simply multiply.
        return q


def _read_block_part(sd: dict, key: str, nblocks: int, required: bool, fmt: Optional[Format] = None):
    if key in sd:
        t = get_tensor(sd, key, torch.float32, nblocks)
        if not torch.isfinite(t).all():
            raise ValueError(f"{key} contains NaN or Inf")
        return t
    nested_key = key + ".nested."
    if nested_key + "quant_meta" in sd:
        inner = QuantizedTensor.from_state_dict(sd, nested_key)
        # The nested table is named by the inner quant_meta (older dicts: always dynamic8); it must be
        # the outer format's scale encoding (dynamic8 for every non-microscaling format).
        expected = (fmt.scale_format if fmt is not None else "") or NESTED_FORMAT
        if inner.numel != nblocks or inner.format.name != expected:
            raise ValueError(f"{nested_key} holds {inner.numel} {inner.format.name} values, expected {nblocks} "
                             f"{expected} values")
        mean = get_tensor(sd, key + ".mean", torch.float32, 1).reshape(())
        if not torch.isfinite(mean):
            raise ValueError(f"{key}.mean is not finite")
        if not inner.format.stored_table and (float(mean) != 0.0 or inner.scales.numel() != 1
                                              or not bool((inner.scales > 0).all())
                                              or (expected == "_e8m0" and float(inner.scales[0]) != 1.0)):
            raise ValueError(f"{nested_key}: a {fmt.name} weight needs one positive tensor scale (1.0 for E8M0) "
                             "and a zero mean (corrupt state dict?)")
        return NestedScales(inner, mean)
    if required:
        raise ValueError(f"state dict is missing {key!r} (or its double-quantized form {nested_key}*)")
    return None
