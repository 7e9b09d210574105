"""Twins of the product ops without an autograd formula, for calls made where grad mode is off
(what `generate` and evaluation loops run under).

A custom op's autograd formula (register_autograd) is a Python function the dispatcher runs on
every call, also under torch.no_grad, where it records nothing: ~11 us of a ~50 us batch-1 call
of a small layer (bench/bench_call.py). An op defined by Library.define with no autograd kernel
passes that dispatch key in C++. So each product op has a twin, qengine::<name>_nograd, with
the same schema (inferred from the same prototype), fake and kernels and no autograd formula,
which KernelWeight.matmul calls where torch.is_grad_enabled() is False: nothing would be
recorded there anyway. A program traced or exported under no_grad calls the twin."""

from __future__ import annotations

from typing import Callable

import torch

_LIB = torch.library.Library("qengine", "FRAGMENT")


def define_nograd_twin(name: str, prototype: Callable, fake: Callable) -> str:
    """Defines qengine::<name>_nograd from the op's prototype (its annotated signature; its body,
    which rejects the device, serves every device without a kernel) and fake; returns the twin's
    name. The device kernels register on it beside the op's (cpu.py, cuda.py)."""
    twin = f"{name}_nograd"
    _LIB.define(twin + torch.library.infer_schema(prototype, mutates_args=()))
    _LIB.impl(twin, prototype, "CompositeExplicitAutograd")
    torch.library.register_fake(f"qengine::{twin}", fake, lib=_LIB)
    return twin
