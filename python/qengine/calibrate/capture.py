"""Calibration capture: the batches a caller passes, the model's decoder-block list, and the
hooks that sum each linear layer's H = X^T X (or only its diagonal) over its calibration inputs.
The block-by-block driver that uses them is calibrate/driver.py."""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn

__all__ = ["Batch", "Stop", "calibration_batches", "find_blocks", "HessianHooks", "run_batch"]

# A token-id tensor [N, T] runs through the model in chunks of about this many tokens: large
# enough for the matmuls to run near the machine's peak, small enough that one chunk's forward
# temporaries (attention scores, MLP intermediates) stay a few hundred MiB at hidden size 4096.
CHUNK_TOKENS = 4096
# H of an input wider than this is summed as strips of its upper triangle (strip i: rows of
# part i, columns from part i on), then mirrored: 3/4 of the flops at 2 parts, 5/8 at 4.
_STRIP = 512

Batch = tuple  # (positional args tuple, kwargs dict): one call model(*args, **kwargs)


class Stop(Exception):
    """Raised inside a forward once everything needed from it has been captured."""


def _input_vocab(model: nn.Module) -> Optional[int]:
    """The vocabulary size when the model takes token ids (a transformers-style input
    embedding), else None."""
    get = getattr(model, "get_input_embeddings", None)
    if get is None:
        return None
    try:
        emb = get()
    except (NotImplementedError, AttributeError):
        return None
    return emb.num_embeddings if isinstance(emb, nn.Embedding) else None


def _check_ids(t: torch.Tensor, vocab: int, where: str) -> torch.Tensor:
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"{where} is {t.dtype}; this model takes token ids (an integer tensor [batch, seq_len], "
                         "e.g. tokenizer(...)['input_ids'])")
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.numel() == 0:
        raise ValueError(f"{where} must be token ids of shape [batch, seq_len] (or [seq_len]), non-empty; got shape "
                         f"{tuple(t.shape)}")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"{where} holds token ids from {lo} to {hi}, outside the model's vocabulary [0, {vocab})")
    return t


def _chunks(t: torch.Tensor) -> list[torch.Tensor]:
    rows = max(1, CHUNK_TOKENS // max(1, t.shape[-1]))
    return list(t.split(rows)) if t.dim() >= 2 else [t]


def calibration_batches(calibration: object, model: nn.Module) -> list[Batch]:
    """The calibration data as a list of model calls, checked before any work.

    calibration: a Tensor (one batch: token ids [N, seq_len] or [seq_len] for a model with an
    input embedding, else the model's one positional input; split into chunks of about
    CHUNK_TOKENS tokens along dim 0), a dict (one call's keyword arguments, e.g. input_ids and
    attention_mask; with input_ids, every tensor with their rows is split alike), an iterable of batches (each a Tensor, a dict or a tuple of positional
    arguments), or a callable returning such an iterable (read once). Token ids are checked
    (integer dtype, 1-D or 2-D, non-empty, inside the vocabulary): ValueError naming the batch.
    """
    if calibration is None:
        raise ValueError("calibration is None")
    if callable(calibration) and not isinstance(calibration, (torch.Tensor, nn.Module)):
        calibration = calibration()
    if isinstance(calibration, (torch.Tensor, dict)):
        items: Iterable = [calibration]
    elif isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise TypeError("calibration must be a Tensor of token ids, a dict of model inputs, an iterable of such "
                        f"batches or a callable returning one; got {type(calibration).__name__}")
    else:
        items = calibration
    vocab = _input_vocab(model)
    batches: list[Batch] = []
    for i, item in enumerate(items):
        where = f"calibration batch {i}"
        if isinstance(item, torch.Tensor):
            t = _check_ids(item, vocab, where) if vocab is not None else item
            batches.extend(((c,), {}) for c in _chunks(t))
        elif isinstance(item, dict):
            kw = dict(item)
            ids = kw.get("input_ids")
            if vocab is not None and ids is not None:
                if not isinstance(ids, torch.Tensor):
                    raise ValueError(f"{where}: input_ids must be a tensor, got {type(ids).__name__}")
                kw["input_ids"] = ids = _check_ids(ids, vocab, f"{where}'s input_ids")
                # Every tensor of the batch's rows (input_ids, attention_mask, ...) split alike.
                rows = len(_chunks(ids)[0])
                split = {k: v.split(rows) for k, v in kw.items()
                         if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == ids.shape[0]}
                for c in range(len(split["input_ids"])):
                    batches.append(((), {**kw, **{k: v[c] for k, v in split.items()}}))
                continue
            batches.append(((), kw))
        elif isinstance(item, (tuple, list)):
            args = tuple(item)
            if vocab is not None and args and isinstance(args[0], torch.Tensor):
                args = (_check_ids(args[0], vocab, where),) + args[1:]
            batches.append((args, {}))
        else:
            raise TypeError(f"{where} is a {type(item).__name__}; a batch is a Tensor, a dict of keyword inputs or a "
                            "tuple of positional inputs")
    if not batches:
        raise ValueError("calibration holds no batches")
    return batches


def find_blocks(model: nn.Module, targets: Iterable[str]) -> Optional[tuple[str, nn.ModuleList]]:
    """(name, list) of the model's repeated-block list: the nn.ModuleList whose children are all
    of one type and which holds the most of the `targets` (linear layers to quantize), e.g.
    model.model.layers of a transformers decoder; None when no such list holds two targets
    (e.g. a plain nn.Sequential), and the caller captures the whole model at once."""
    targets = list(targets)
    best, best_count = None, 1
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or len({type(m) for m in mod}) != 1:
            continue
        prefix = f"{name}." if name else ""
        count = sum(1 for t in targets if t.startswith(prefix) and t[len(prefix):].split(".", 1)[0].isdigit()
                    and "." in t[len(prefix):])
        if count > best_count:
            best, best_count = (name, mod), count
    return best


def _add_xtx(H: torch.Tensor, x: torch.Tensor) -> bool:
    """H += x^T x for x [n, k]; returns True when only the upper strips were written (the
    caller mirrors them with symmetrize)."""
    k = x.shape[1]
    parts = k // _STRIP if k >= 2 * _STRIP else 1
    if parts == 1:
        H.addmm_(x.t(), x)
        return False
    edges = [round(i * k / parts) for i in range(parts + 1)]
    for a, b in zip(edges, edges[1:]):
        H[a:b, a:].addmm_(x[:, a:b].t(), x[:, a:])
    return True


def symmetrize(H: torch.Tensor) -> torch.Tensor:
    """The full symmetric matrix from its upper triangle."""
    upper = torch.triu(H)
    return upper.add_(torch.triu(H, 1).t())


class HessianHooks:
    """Forward pre-hooks on linear layers that sum, per distinct input, H = X^T X (float32
    [in, in]; full=False: only its diagonal [in]) and the number of rows X had.

    Layers fed the very same tensor in a call (q/k/v, gate/up) share one H: the first of them
    to run owns it, the others are recorded as aliases of it. `stop` raises Stop once every
    hooked layer has seen its input in the current batch (call begin_batch before each), so
    the rest of that forward is skipped. Non-finite inputs raise ValueError naming the layer.
    """

    def __init__(self, modules: dict[str, nn.Module], full: bool, stop: bool,
                 experts: Optional[dict[str, nn.Module]] = None):
        self.full, self.stop = full, stop
        self.H: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.alias: dict[str, str] = {}
        self._strips: set[str] = set()
        self._names = list(modules) + list(experts or {})
        self._pending: set[str] = set()
        self._last: Optional[tuple[torch.Tensor, str]] = None
        self.batch = -1
        self._handles = [mod.register_forward_pre_hook(self._hook(name), with_kwargs=True)
                         for name, mod in modules.items()]
        self._handles += [mod.register_forward_pre_hook(self._experts_hook(name), with_kwargs=True)
                          for name, mod in (experts or {}).items()]

    def begin_batch(self, index: int) -> None:
        self.batch = index
        self._pending = set(self._names)
        self._last = None

    def _hook(self, name: str) -> Callable:
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            self._pending.discard(name)
            if self._last is not None and x is self._last[0] and self._last[1] != name:
                owner = self._last[1]
                if self.alias.setdefault(name, owner) != owner or name in self.H:
                    raise RuntimeError(f"{name} was fed the input of {owner} in calibration batch {self.batch} but "
                                       "not in an earlier one; calibration assumes the model calls its layers the "
                                       "same way for every batch")
            else:
                if name in self.alias:
                    raise RuntimeError(f"{name} shared the input of {self.alias[name]} in an earlier calibration "
                                       f"batch but not in batch {self.batch}")
                self._accumulate(name, x)
                self._last = (x, name)
            if self.stop and not self._pending:
                raise Stop
        return hook

    def _experts_hook(self, name: str) -> Callable:
        """Per expert of a transformers experts module (3-D weights): H of the tokens routed to
        it (key "<name>:up:<e>") and of the input of its down projection, act(gate) * up computed
        with the float weights ("<name>:down:<e>")."""
        def hook(mod, args, kwargs):
            self._pending.discard(name)
            hidden = args[0] if args else kwargs["hidden_states"]
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            x = hidden.detach().reshape(-1, hidden.shape[-1]).to(torch.float32)
            index = index.reshape(x.shape[0], -1)
            up, bias, gate = _experts_up(mod)
            for e in torch.unique(index).tolist():
                if not 0 <= e < up.shape[0]:  # transformers' sentinel for a dropped token
                    continue
                xe = x[(index == e).any(dim=-1)]
                self._accumulate(f"{name}:up:{e}", xe, f"{name} (expert {e})")
                w = up[e].to(torch.float32)  # one expert's weight at a time
                a = xe @ (w if mod.is_transposed else w.t())
                self._accumulate(f"{name}:down:{e}", gate(a if bias is None else a + bias[e]),
                                 f"{name} (expert {e}'s down projection)")
            if self.stop and not self._pending:
                raise Stop
        return hook

    def _accumulate(self, name: str, x: torch.Tensor, label: Optional[str] = None) -> None:
        k = x.shape[-1]
        x2 = x.detach().reshape(-1, k).to(torch.float32)
        if name not in self.H:
            shape = (k, k) if self.full else (k,)
            self.H[name] = torch.zeros(shape, dtype=torch.float32, device=x.device)
            self.rows[name] = 0
        H = self.H[name]
        if self.full:
            if _add_xtx(H, x2):
                self._strips.add(name)
            diag = H.diagonal()
        else:
            H.add_(x2.square().sum(0))
            diag = H
        self.rows[name] += x2.shape[0]
        # A NaN or Inf anywhere in a column of X reaches that column's diagonal entry, so checking
        # the diagonal (k values) catches every non-finite activation.
        if not bool(torch.isfinite(diag).all()):
            raise ValueError(f"the calibration activations reaching {label or name} are not finite (NaN or Inf) in calibration "
                             f"batch {self.batch}: check the calibration inputs and the model's float weights")

    def owner(self, name: str) -> str:
        return self.alias.get(name, name)

    def seen(self, name: str) -> bool:
        return self.rows.get(self.owner(name), 0) > 0

    def hessian(self, name: str) -> tuple[torch.Tensor, int]:
        """(H, rows) of a layer's input (shared with its aliases); H complete (mirrored)."""
        owner = self.owner(name)
        if owner in self._strips:
            self.H[owner] = symmetrize(self.H[owner])
            self._strips.discard(owner)
        return self.H[owner], self.rows[owner]

    def expert_hessians(self, name: str, which: str, experts: int) -> list:
        """[(H or None when no token reached the expert, rows)] per expert of an experts
        module's "up" or "down" matrix."""
        out = []
        for e in range(experts):
            key = f"{name}:{which}:{e}"
            out.append(self.hessian(key) if key in self.H else (None, 0))
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def run_batch(model: nn.Module, batch: Batch, index: int):
    """model(*args, **kwargs) of one calibration batch; Stop ends it early; the model's own
    errors become a ValueError naming the batch."""
    args, kwargs = batch
    try:
        return model(*args, **kwargs)
    except Stop:
        return None
    except (RuntimeError, TypeError, IndexError, KeyError) as e:
        raise ValueError(f"calibration batch {index} does not run through the model ({type(e).__name__}: {e}); "
                         "pass the model's inputs (token ids [batch, seq_len] or a dict of keyword inputs)") from e


def _experts_up(mod: nn.Module):
    """(up weights [E, n_up, K], or [E, K, n_up] when the module is transposed, in their own
    dtype; their bias [E, n_up] or None; the gate function a [T, n_up] -> the down projection's
    input) of a transformers experts module."""
    from ..moe import expert_weight_names, experts_layout
    from ..ops.moe_torch import ACTIVATION_FUNCTIONS, apply_gate

    layout, code = experts_layout(mod)
    attr = expert_weight_names(mod)[0]
    w = getattr(mod, attr).detach()
    bias = getattr(mod, f"{attr}_bias", None) if getattr(mod, "has_bias", False) else None
    act = getattr(mod, "act_fn", None) or ACTIVATION_FUNCTIONS[code]

    def gate(a: torch.Tensor) -> torch.Tensor:
        return apply_gate(a, layout, act)

    return w, (None if bias is None else bias.detach().to(torch.float32)), gate
