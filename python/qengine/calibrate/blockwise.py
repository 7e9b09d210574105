"""The decoder-block passes of calibrated quantization (steps 1-3 of calibrate/driver.py's
docstring): record every block's call with stand-in forwards, capture and quantize block by
block, then capture the layers after the blocks with the blocks replayed from stored outputs."""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import nn

from .capture import Batch, HessianHooks, Stop, calibration_batches, find_blocks, run_batch

__all__ = ["blockwise"]

# Quantizes the named float linears from the hooks' statistics; returns the rows summed into
# the first one's H (the calibration token count).
QuantizeNames = Callable[[list, HessianHooks], int]


class _NoHidden(Exception):
    """A block was called without its hidden states as the first argument or hidden_states=."""


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _call_block(block: nn.Module, h: torch.Tensor, call: tuple):
    positional, rest, kwargs = call
    return block(h, *rest, **kwargs) if positional else block(*rest, hidden_states=h, **kwargs)


@contextlib.contextmanager
def _patched(blocks: nn.ModuleList, forward_of: Callable):
    """Each block's forward replaced (an instance attribute) by forward_of(i); restored after.
    Block attributes the model reads (e.g. a layer's attention type) stay in place."""
    try:
        for i, blk in enumerate(blocks):
            blk.forward = forward_of(i)
        yield
    finally:
        for blk in blocks:
            blk.__dict__.pop("forward", None)


def _record(model: nn.Module, blocks: nn.ModuleList, batches: list[Batch], hooked: dict, full: bool):
    """The stand-in pass: (hidden states reaching block 0 per batch, calls[i][b] = block i's
    other arguments in batch b (cache disabled), hooks on the `hooked` modules), or None when the
    model does not call its blocks one after another, once each per forward, with the hidden
    states first or as hidden_states=."""
    n = len(blocks)
    hidden: list = []
    calls: list[list] = [[] for _ in range(n)]

    def forward_of(i):
        def forward(*args, **kwargs):
            if args:
                h, rest, positional = args[0], args[1:], True
            elif isinstance(kwargs.get("hidden_states"), torch.Tensor):
                kwargs = dict(kwargs)
                h, rest, positional = kwargs.pop("hidden_states"), (), False
            else:
                raise _NoHidden
            for key in ("cache", "past_key_values", "past_key_value", "layer_past"):
                if key in kwargs:
                    kwargs[key] = None
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            calls[i].append((positional, rest, kwargs))
            if i == 0:
                hidden.append(h)
            if i == n - 1:
                raise Stop
            return h
        return forward

    hooks = HessianHooks(hooked, full, stop=False)
    try:
        with _patched(blocks, forward_of):
            for b, batch in enumerate(batches):
                hooks.begin_batch(b)
                try:
                    run_batch(model, batch, b)
                except _NoHidden:
                    return None
                if any(len(c) != b + 1 for c in calls):
                    return None
    finally:
        hooks.remove()
    return hidden, calls, hooks


def blockwise(model: nn.Module, found: tuple[str, nn.ModuleList], names: list[str], experts: list[str],
              batches: list[Batch], full: bool, sequential: bool, quantize_names: QuantizeNames,
              quantize_experts: Callable[[str, HessianHooks], None], progress: Optional[str] = None):
    """Quantizes `names` (and, by quantize_experts, the transformers experts modules inside the
    blocks, from the same hooks' per-expert statistics) block by block; returns (calibration tokens, number of blocks, experts modules done), or None
    (nothing changed) when the model does not call its blocks in the way this assumes."""
    prefix, blocks = found
    pre = f"{prefix}." if prefix else ""
    n = len(blocks)
    per_block = [[nm for nm in names if nm.startswith(f"{pre}{i}.")] for i in range(n)]
    experts_in = [[e for e in experts if e.startswith(f"{pre}{i}.")] for i in range(n)]
    inside = {nm for lst in per_block for nm in lst}
    outside = [nm for nm in names if nm not in inside]
    rec = _record(model, blocks, batches, {nm: model.get_submodule(nm) for nm in outside}, full)
    if rec is None:
        return None
    hidden, calls, pre_hooks = rec
    before = [nm for nm in outside if pre_hooks.seen(nm)]  # layers the model runs before block 0
    tokens = quantize_names(before, pre_hooks)
    del pre_hooks
    if before and sequential:  # block 0 must see their quantized outputs
        hidden, calls, _ = _record(model, blocks, batches, {}, full)
    out_is_tuple = False
    order = range(n)
    if progress:
        try:
            from tqdm.auto import tqdm
            order = tqdm(order, desc=progress, unit="block", disable=None)
        except ImportError:
            pass
    for i in order:
        block = blocks[i]
        hooks = HessianHooks({nm: model.get_submodule(nm) for nm in per_block[i]}, full, stop=sequential,
                             experts={e: model.get_submodule(e) for e in experts_in[i]})
        work = per_block[i] or experts_in[i]
        try:
            for b in range(len(hidden)):
                hooks.begin_batch(b)
                try:
                    out = _call_block(block, hidden[b], calls[i][b])
                except Stop:  # sequential: every linear of the block has its input; the output is not needed
                    continue
                out_is_tuple = isinstance(out, (tuple, list))
                if not sequential or not work:
                    hidden[b] = _hidden(out)
        finally:
            hooks.remove()
        rows = quantize_names(per_block[i], hooks)
        tokens = tokens or rows
        for e in experts_in[i]:
            quantize_experts(e, hooks)
        del hooks
        if sequential and work:  # the quantized block's outputs feed the next block
            for b in range(len(hidden)):
                out = _call_block(block, hidden[b], calls[i][b])
                out_is_tuple = isinstance(out, (tuple, list))
                hidden[b] = _hidden(out)
    after = [nm for nm in outside if nm not in before]
    if after:
        _tail(model, blocks, hidden, out_is_tuple, batches, after, full, quantize_names)
    return tokens, n, {e for lst in experts_in for e in lst}


def _tail(model, blocks, hidden, out_is_tuple, batches, names, full, quantize_names) -> None:
    """Step 3: the layers after the blocks, captured in a pass where block 0 returns the stored
    final hidden states of the batch and the other blocks pass them through."""
    current = [0]

    def forward_of(i):
        def forward(*args, **kwargs):
            h = hidden[current[0]] if i == 0 else (args[0] if args else kwargs["hidden_states"])
            return (h,) if out_is_tuple else h
        return forward

    hooks = HessianHooks({nm: model.get_submodule(nm) for nm in names}, full, stop=True)
    try:
        with _patched(blocks, forward_of):
            for b, batch in enumerate(batches):
                current[0] = b
                hooks.begin_batch(b)
                run_batch(model, batch, b)
    finally:
        hooks.remove()
    quantize_names(names, hooks)


def run_hooked(model: nn.Module, hooks: HessianHooks, batches) -> HessianHooks:
    """Runs every calibration batch through the whole model with `hooks` collecting (a model
    without a block list), removes them, and returns them for reading."""
    try:
        for b, batch in enumerate(batches):
            hooks.begin_batch(b)
            run_batch(model, batch, b)
    finally:
        hooks.remove()
    return hooks

def each_hessian(model: nn.Module, names: list, calibration, fn: Callable[[str, torch.Tensor, int], None]) -> None:
    """Calls fn(name, H float32 [in, in], rows) for every named linear, H = X^T X of its inputs
    while the float `model` runs `calibration` (decoder block by decoder block when the model
    has a block list: one block's H resident at a time). Names no data reached are skipped."""
    def measure(nms, hooks) -> int:
        for n in nms:
            if hooks.seen(n):
                H, rows = hooks.hessian(n)
                fn(n, H, rows)
        return 0

    batches = calibration_batches(calibration, model)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            found = find_blocks(model, names)
            done = None if found is None else blockwise(model, found, names, [], batches, True, False, measure,
                                                        lambda e, hooks: None)
            if done is None:
                measure(names, run_hooked(model, HessianHooks({n: model.get_submodule(n) for n in names}, True,
                                                              stop=True), batches))
    finally:
        model.train(training)
