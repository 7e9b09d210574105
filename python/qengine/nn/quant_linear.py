"""QuantLinear: a drop-in nn.Linear whose weight is stored blockwise-quantized (packed codes,
scales, nested scales) and multiplied through the qengine::matmul op without a dense copy."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._bnb_layout import from_bnb_state_dict, to_bnb_state_dict
from .._checks import FLOAT_DTYPES, check_stored_blocksize
from ..formats import Format, get_format
from ..functional import matmul, quantize
from ..microscaling import tensor_scale_blocksize
from ..ops import KernelWeight
from ..tensor import NESTED_FORMAT, NestedScales, PackedParameter, QuantizedTensor
from .quant_state import CACHE_INPUTS, STATE, STATE_NAMES, state_tensors

__all__ = ["QuantLinear", "QUANT_STORAGE_DTYPES"]

# Packed codes may be stored viewed as a wider *integer* dtype (so FSDP can shard them with
# parameters of that dtype), never as a float dtype: casts and collectives canonicalise NaN bit
# patterns in floats and would silently corrupt the codes.
QUANT_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class QuantLinear(nn.Module):
    """``y = x @ W^T + bias`` with W stored quantized (``qengine.quantize`` layout).

    State: ``weight_packed`` is a frozen nn.Parameter (uint8 [nbytes], or the same bytes viewed
    as ``quant_storage``, zero-padded to whole elements) so FSDP can shard it; the per-block
    scales (float32 [nblocks], or uint8 codes + nested absmax/mean with double quant), offsets
    and codebook tables are buffers. ``bias`` (float, [out_features]) stays a float parameter.
    Forward is pure (sets no state), so ``torch.compile(fullgraph=True)`` traces it whole.

    The state dict is qengine's flat QuantizedTensor layout under ``weight.`` (packed, scales,
    nested parts, codebook, quant_meta) plus ``bias``; ``load_state_dict`` also accepts the
    transformers + bitsandbytes ``Linear4bit`` keys (``weight``, ``weight.absmax``, ...,
    ``weight.quant_state.bitsandbytes__nf4``) without re-quantizing.
    """

    # The nested tables' formats (set by _set_quantized); the class default keeps layers pickled
    # before the microscaling formats existed (always dynamic8) loading.
    scales_nested_format = NESTED_FORMAT
    offsets_nested_format = NESTED_FORMAT

    def __init__(self, in_features: int, out_features: int, bias: bool = True, format: str | Format = "nf4",
                 blocksize: Optional[int] = 64, double_quant: bool = True,
                 compute_dtype: Optional[torch.dtype] = None, quant_storage: torch.dtype = torch.uint8,
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        _check_options(compute_dtype, quant_storage)
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.quant_storage = quant_storage
        if blocksize is not None:  # a skeleton may hold a stored layout's smaller block (GGUF Q6_K: 16)
            check_stored_blocksize(blocksize)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        # A zero weight of the right layout: a skeleton for load_state_dict (no dense allocation).
        q = quantize(torch.zeros(1, 64), format, 64, double_quant)  # the format's parts, resized below
        fmt = q.format
        per_row = blocksize is None and not fmt.fixed_blocksize
        bs = fmt.fixed_blocksize or (in_features if per_row else int(blocksize))
        numel = in_features * out_features
        nblocks = -(-numel // bs)
        packed = torch.zeros(-(-numel * fmt.bits // 8), dtype=torch.uint8, device=device)

        def part(p):
            if p is None:
                return None
            if isinstance(p, NestedScales):
                inner = p.quantized
                nbs = tensor_scale_blocksize(nblocks) if fmt.fixed_blocksize else inner.blocksize
                nb2 = -(-nblocks // nbs)
                codes = QuantizedTensor(torch.zeros(nblocks, dtype=torch.uint8, device=device),
                                        torch.ones(nb2, device=device), None, inner.format, torch.Size([nblocks]),
                                        torch.float32, nbs)
                return NestedScales(codes, torch.zeros((), device=device))
            return torch.zeros(nblocks, device=device)

        skeleton = QuantizedTensor(packed, part(q.scales), part(q.offsets), fmt, torch.Size([out_features, in_features]),
                                   dtype, bs, per_row)
        self.register_parameter("bias", nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
                                if bias else None)
        self._set_quantized(skeleton)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, format: str | Format = "nf4", blocksize: Optional[int] = 64,
                    double_quant: bool = True, compute_dtype: Optional[torch.dtype] = None,
                    quant_storage: torch.dtype = torch.uint8, sparsity: Optional[str] = None,
                    mask: Optional[torch.Tensor] = None) -> "QuantLinear":
        """Quantizes `linear.weight` (float [out, in], finite) once; the bias is copied in its
        dtype. `linear` is not modified. sparsity ("2:4") and mask (bool [out, in], from
        qengine.prune) as in qengine.quantize."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        q = quantize(w if w.is_contiguous() else w.contiguous(), format, blocksize, double_quant, sparsity=sparsity,
                     mask=mask)
        bias = None if linear.bias is None else linear.bias.detach().clone().requires_grad_(linear.bias.requires_grad)
        return cls.from_quantized(q, bias, compute_dtype=compute_dtype, quant_storage=quant_storage)

    @classmethod
    def from_quantized(cls, q: QuantizedTensor, bias: Optional[torch.Tensor] = None,
                       compute_dtype: Optional[torch.dtype] = None,
                       quant_storage: torch.dtype = torch.uint8) -> "QuantLinear":
        """A layer around an existing QuantizedTensor of shape [out, in] (not copied)."""
        if not isinstance(q, QuantizedTensor):
            raise TypeError(f"q must be a QuantizedTensor, got {type(q).__name__}")
        if len(q.shape) != 2:
            raise ValueError(f"q must be 2-D [out_features, in_features], got shape {tuple(q.shape)}")
        out_f, in_f = q.shape
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = int(in_f), int(out_f)
        _check_options(compute_dtype, quant_storage)
        self.compute_dtype, self.quant_storage = compute_dtype, quant_storage
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or bias.shape != (out_f,) or bias.dtype not in FLOAT_DTYPES:
                raise ValueError(f"bias must be a float tensor of shape ({out_f},)")
            bias = nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
        self.register_parameter("bias", bias)
        self._set_quantized(q)
        return self

    def _set_quantized(self, q: QuantizedTensor) -> None:
        """Stores q's parts as this module's STATE (no copy of the codes unless quant_storage
        needs padding)."""
        self.format, self.blocksize, self.per_row, self.weight_dtype = q.format, q.blocksize, q.per_row, q.dtype
        self.layout = q.layout  # "dense", or "2:4" (weight_positions)
        # The nested block sizes as Python ints (quantized() rebuilds the nested tensors with them).
        for part, value in (("scales", q.scales), ("offsets", q.offsets)):
            nested = isinstance(value, NestedScales)
            setattr(self, part + "_nested_blocksize", value.quantized.blocksize if nested else 0)
            setattr(self, part + "_nested_format", value.quantized.format.name if nested else NESTED_FORMAT)
        parts = state_tensors(q)
        self._packed_bytes = q.packed.numel()
        packed = parts.pop("weight_packed")
        width = torch.empty((), dtype=self.quant_storage).element_size()
        if self.quant_storage != torch.uint8:
            pad = (-packed.numel()) % width
            if pad:
                packed = torch.cat([packed, packed.new_zeros(pad)])
            packed = packed.view(self.quant_storage)
        self.weight_packed = PackedParameter(packed)  # frozen; requires_grad_(True) says what to do
        for field in STATE[1:]:
            self._set_state(field.name, parts[field.name], field.persistent)
        self._cache_kernel_weight()

    def _set_state(self, name: str, t: Optional[torch.Tensor], persistent: bool = True) -> None:
        """Stores a part of the quantized state as buffer `name`, or an absent part as a plain
        None attribute, never as a buffer slot holding None: torch.export's non-strict mode
        (torch 2.13, _trace._make_fx_helper) numbers the root module's buffers counting None
        slots but its graph inputs without them, and fails with an IndexError (or maps buffer
        names one slot off) on a module that has such a slot."""
        if t is None:
            self._buffers.pop(name, None)
            self._non_persistent_buffers_set.discard(name)
            setattr(self, name, None)
        else:
            self.__dict__.pop(name, None)
            self.register_buffer(name, t, persistent=persistent)

    # ------------------------------------------------------------------ views of the state
    @property
    def double_quant(self) -> bool:
        return self.weight_scales_absmax is not None

    def _nested(self, part: str) -> list:
        """[] or the nested [table, absmax, mean, blocksize] of weight_{part} (mean checked)."""
        absmax = getattr(self, f"weight_{part}_absmax")
        if absmax is None:
            return []
        mean = getattr(self, f"weight_{part}_mean")
        if mean.numel() != 1:  # replaced since: say which, not torch's reshape error
            raise ValueError(f"weight_{part}_mean must have 1 element, got shape {tuple(mean.shape)} (was it "
                             "replaced?)")
        return [getattr(self, f"weight_{part}_table"), absmax, mean, getattr(self, f"weight_{part}_bs")]

    def quantized(self) -> QuantizedTensor:
        """The weight as a QuantizedTensor sharing this module's storage (no copy)."""
        def part(name):
            codes = getattr(self, f"weight_{name}")
            nested = self._nested(name) if codes is not None else []
            if not nested:
                return codes
            inner = QuantizedTensor(codes, nested[1], None, get_format(getattr(self, name + "_nested_format")),
                                    torch.Size([codes.numel()]),
                                    torch.float32, getattr(self, name + "_nested_blocksize"))
            return NestedScales(inner, nested[2].reshape(()))

        return QuantizedTensor(self._packed_uint8(), part("scales"), part("offsets"), self.format,
                               torch.Size([self.out_features, self.in_features]), self.weight_dtype,
                               self.blocksize, self.per_row, self.layout, self.weight_positions, self.weight_mask)

    def kernel_weight(self) -> KernelWeight:
        """The weight as the kernels take it (shares this module's storage): double-quantized
        scales stay uint8 codes decoded in the kernel; offsets are decoded here. Built once per
        change of the state (see _cache_kernel_weight), so forward skips ~15 attribute reads."""
        cached = self.__dict__.get("_kernel_weight")
        if cached is not None and self._state_objects() == cached[1]:
            self._packed_uint8()  # its checks: `.data =` may have changed the codes' dtype or size
            return cached[0]
        return self._build_kernel_weight()

    def _state_objects(self) -> tuple:
        """The STATE tensor objects by identity (torch.export and stateless calls swap them
        without __setattr__): a cached kernel_weight() is valid only while these are its own."""
        params, buffers = self._parameters, self._buffers
        return tuple([id(params.get(n, buffers.get(n))) for n in STATE_NAMES])

    def _cache_kernel_weight(self) -> None:
        """Caches kernel_weight() after the state was set or moved. Only where the cache cannot
        go stale: its tensors are this module's own objects, so in-place writes, `.data =` and
        swap_tensors reach it; assigning a state attribute drops it (__setattr__), swapping the
        objects behind the module's back bypasses it (_state_objects). Codes viewed as a wider
        quant_storage are re-viewed per call instead (a view would keep the old storage)."""
        self.__dict__["_kernel_weight"] = None
        # Decoded nested offsets are a copy: an in-place write to their codes would not reach it.
        if self.quant_storage == torch.uint8 and self.weight_offsets_absmax is None:
            try:
                self.__dict__["_kernel_weight"] = (self._build_kernel_weight(), self._state_objects())
            except (TypeError, ValueError):  # an inconsistent state: forward builds it and raises there
                pass

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in CACHE_INPUTS:
            self.__dict__["_kernel_weight"] = None

    def _build_kernel_weight(self) -> KernelWeight:
        offsets, offsets_nested = self.weight_offsets, self._nested("offsets")
        if offsets is not None and offsets_nested:
            offsets = KernelWeight.decode_nested(offsets, offsets_nested, self.offsets_nested_blocksize)
        return KernelWeight(self._packed_uint8(), self.weight_table, self.format.bits, self.blocksize,
                            self.weight_scales, self._nested("scales"), offsets, (self.out_features, self.in_features),
                            self.layout, self.weight_positions)

    def _packed_uint8(self) -> torch.Tensor:
        p = self.weight_packed
        # weight_packed may have been replaced (attribute assignment, `.data = ...`) since
        # _packed_bytes was cached: a wider or longer one would be cut to a prefix of the wrong
        # bytes here, a strided one fail inside .view with no name.
        if p.dtype != self.quant_storage:
            raise TypeError(f"weight_packed must be {self.quant_storage} (this layer's quant_storage), got {p.dtype} "
                            "(was it replaced? load a state dict, or build the layer with from_quantized)")
        if p.numel() != -(-self._packed_bytes // p.element_size()) or not p.is_contiguous():
            raise ValueError(f"weight_packed must be a contiguous {p.dtype} tensor of "
                             f"{-(-self._packed_bytes // p.element_size())} elements ({self._packed_bytes} bytes of "
                             f"codes for this {self.out_features}x{self.in_features} layer), got shape "
                             f"{tuple(p.shape)} with strides {tuple(p.stride())} (was it replaced?)")
        if p.dtype != torch.uint8:
            p = p.view(torch.uint8)[: self._packed_bytes]
        return p

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense weight [out_features, in_features] (default dtype: the original weight's)."""
        return self.quantized().dequantize(dtype)

    @property
    def weight_nbytes(self) -> int:
        """Bytes held by the quantized weight: codes (with padding), scales, nested state, tables."""
        return sum(t.numel() * t.element_size() for field in STATE
                   if field.persistent and (t := getattr(self, field.name)) is not None)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, lora: Optional[tuple] = None) -> torch.Tensor:
        """x: float [..., in_features] -> [..., out_features] in x's dtype (computed in
        compute_dtype when set). lora: optional (A [r, in], B [out, r], scale) side path fused
        into the same kernel, as qengine.matmul takes it."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must be a tensor [..., in_features={self.in_features}], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        in_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        a = b = None
        s = 0.0
        if lora is not None:
            a, b, s = lora
        if self.weight_mask is not None:  # a stored pruning mask: the product on the masked dense weight
            return matmul(x, self.quantized(), self.bias, lora).to(in_dtype)
        y = self.kernel_weight().matmul(x, a, b, float(s))  # the dense or 2:4 layout's op
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(in_dtype)

    # ------------------------------------------------------------------ movement
    def _apply(self, fn, recurse=True):
        # Float casts (model.half(), .to(torch.bfloat16)) reach only the bias; the quantization
        # state moves between devices but keeps its dtypes, and is never re-quantized.
        state = {id(t) for field in STATE if (t := getattr(self, field.name)) is not None}

        def guarded(t):
            out = fn(t)
            if id(t) in state and out.dtype != t.dtype:
                out = t.to(out.device)
            return out

        out = super()._apply(guarded, recurse)
        self._cache_kernel_weight()
        return out

    # ------------------------------------------------------------------ state dict
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, t in self.quantized().state_dict(prefix + "weight.").items():
            destination[key] = t if keep_vars else t.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        own = [k for k in state_dict if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0] == "weight"]
        if any(".quant_state.bitsandbytes__" in k for k in own):
            q = from_bnb_state_dict(state_dict, prefix + "weight")
        elif prefix + "weight.quant_meta" in state_dict:
            q = QuantizedTensor.from_state_dict(state_dict, prefix + "weight.")
        elif own:
            raise ValueError(f"{prefix}weight is not a quantized state (no {prefix}weight.quant_meta or bitsandbytes "
                             f"quant_state): use QuantLinear.from_linear to quantize a float nn.Linear weight")
        else:
            missing_keys.append(prefix + "weight.quant_meta")
            q = None
        if q is not None:
            if tuple(q.shape) != (self.out_features, self.in_features):
                raise ValueError(f"{prefix}weight has shape {tuple(q.shape)}, this layer expects "
                                 f"({self.out_features}, {self.in_features})")
            device = self.weight_packed.device
            self._set_quantized(q.to(device) if q.device != device else _own(q))
        bias_key = prefix + "bias"
        if self.bias is not None:
            if bias_key not in state_dict:
                missing_keys.append(bias_key)
            else:
                b = state_dict[bias_key]
                if not isinstance(b, torch.Tensor) or b.shape != self.bias.shape:
                    raise ValueError(f"{bias_key} must have shape {tuple(self.bias.shape)}, got "
                                     f"{tuple(getattr(b, 'shape', ()))}")
                with torch.no_grad():
                    self.bias.copy_(b)
        if strict and q is not None:
            from_bnb = any(".quant_state.bitsandbytes__" in k for k in own)
            known = set(self.quantized().state_dict(prefix + "weight."))
            for k in state_dict:
                if not k.startswith(prefix) or k == bias_key and self.bias is not None:
                    continue
                if k not in known and not (from_bnb and _is_bnb_key(k, prefix)):
                    unexpected_keys.append(k)

    def to_bnb_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The transformers + bitsandbytes ``Linear4bit`` state dict of this layer (nf4/fp4)."""
        sd = to_bnb_state_dict(self.quantized(), prefix + "weight")
        if self.bias is not None:
            sd[prefix + "bias"] = self.bias.detach()
        return sd

    def extra_repr(self) -> str:
        bs = "row" if self.per_row else self.blocksize
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format.name}, blocksize={bs}, double_quant={self.double_quant}, "
                f"bytes={self.weight_nbytes}, bits_per_param="
                f"{8 * self.weight_nbytes / (self.in_features * self.out_features):.3f}")


def _check_options(compute_dtype, quant_storage) -> None:
    if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
        raise TypeError(f"compute_dtype must be None, float32, float16 or bfloat16, got {compute_dtype}")
    if quant_storage not in QUANT_STORAGE_DTYPES:
        raise TypeError(f"quant_storage must be an integer dtype {QUANT_STORAGE_DTYPES}, got {quant_storage} "
                        "(float views of packed codes get NaN-canonicalised by casts and collectives)")


def _is_bnb_key(key: str, prefix: str) -> bool:
    rest = key[len(prefix):]
    return rest == "weight" or rest.split(".")[1:2] in (["absmax"], ["quant_map"], ["nested_absmax"],
                                                       ["nested_quant_map"], ["quant_state"])


def _own(q: QuantizedTensor) -> QuantizedTensor:
    """q with its tensors cloned, so the module never aliases the caller's state dict."""
    def c(p):
        if p is None:
            return None
        if isinstance(p, NestedScales):
            return NestedScales(_own(p.quantized), p.mean.clone())
        return p.clone()

    return QuantizedTensor(q.packed.clone(), c(q.scales), c(q.offsets), q.format, q.shape, q.dtype, q.blocksize,
                           q.per_row, q.layout, c(q.positions), c(q.mask))
