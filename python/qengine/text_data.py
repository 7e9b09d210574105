"""Training text for the command line: reading .txt / .jsonl files, a byte-level tokenizer for
models that ship none, and deterministic batches (the batch of step s depends only on the seed
and s, so a resumed run sees exactly the batches an uninterrupted one would)."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

__all__ = ["ByteTokenizer", "read_texts", "tokenize_corpus", "batch_for_step"]


class ByteTokenizer:
    """UTF-8 bytes as tokens 3..258, with pad=0, bos=1, eos=2 (vocabulary 259). Needs nothing
    on disk, so a model built from a config alone can be trained and sampled."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    vocab_size = 259
    _offset = 3

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [b + self._offset for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids) -> str:
        # ids outside the 256 bytes (specials, or a model vocabulary larger than this tokenizer's) have no text
        data = bytes(int(i) - self._offset for i in ids if 0 <= int(i) - self._offset < 256)
        return data.decode("utf-8", errors="replace")


def read_texts(path: str | os.PathLike) -> list[str]:
    """The documents of a .txt file (one document) or a .jsonl file (one JSON object per line
    with a "text" field). Raises ValueError naming the file and line on anything else."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {path!r} is not UTF-8 text: {e}") from None
    if ext == ".txt":
        texts = [raw]
    elif ext == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"{path}:{n}: expected an object with a string field \"text\"")
            texts.append(obj["text"])
    else:
        raise ValueError(f"data file {path!r} must end in .txt or .jsonl")
    if not any(t.strip() for t in texts):
        raise ValueError(f"data file {path!r} contains no text")
    return texts


def tokenize_corpus(texts: list[str], tokenizer) -> torch.Tensor:
    """All documents as one int64 token stream (each starting with BOS when the tokenizer has one)."""
    ids: list[int] = []
    for t in texts:
        if isinstance(tokenizer, ByteTokenizer):
            ids.extend(tokenizer.encode(t))
        else:
            ids.extend(tokenizer(t)["input_ids"])
    return torch.tensor(ids, dtype=torch.int64)


def batch_for_step(stream: torch.Tensor, step: int, batch: int, seq_len: int, seed: int,
                   device: Optional[torch.device] = None) -> torch.Tensor:
    """[batch, seq_len] windows of the token stream at offsets drawn from (seed, step) alone."""
    if stream.numel() < seq_len + 1:
        raise ValueError(f"the data has {stream.numel()} tokens, fewer than --seq-len {seq_len} + 1")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, stream.numel() - seq_len, (batch,), generator=gen)
    rows = torch.stack([stream[s:s + seq_len] for s in starts.tolist()])
    return rows.to(device) if device is not None else rows
