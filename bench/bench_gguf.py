# Peak resident memory of loading a llama.cpp GGUF file: qengine.hf.load_model("x.gguf") (blocks
# placed in QuantLinear as they are) against transformers' own GGUF load (every tensor dequantized
# to float32), on a Llama file written here by the gguf package with Q4_0, Q4_K and Q6_K tensors.
"""Usage: python bench/bench_gguf.py [--layers 4] [--hidden 2048] [--json bench/out/gguf.json]

Each load runs in a fresh Python process. Its baseline is the resident size after importing
torch, transformers, gguf and qengine and loading a 1-layer file of the same kind (so the code
paths imported lazily count as the interpreter's); the resident-set high-water mark is then
reset (/proc/self/clear_refs) and read after the load, with every weight touched. Reported
against issue 26's target: peak - baseline <= file size + 1.5 x the largest layer, the largest
layer counted as the file's largest tensor in its stored bytes (and, looser, the same tensor
as float32, the count used before). Never asserts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _harness as H  # noqa: E402

CHILD = H.PROC_STATUS_KIB + r"""
import json, os, sys, time
import torch, transformers, gguf, qengine, qengine.hf
path, warm, mode = sys.argv[1], sys.argv[2], sys.argv[3]
def load(p):
    if mode == "transformers":
        return transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p),
                                                                 dtype=torch.float32)
    return qengine.hf.load_model(p)
load(warm)
import gc
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = kib("VmRSS")
t = time.perf_counter()
model = load(path)
secs = time.perf_counter() - t
for tensor in list(model.parameters()) + list(model.buffers()):
    flat = tensor.detach().reshape(-1)
    if flat.is_floating_point():
        float(flat[:: max(1, 4096 // flat.element_size())].double().sum())
peak = kib("VmHWM")
rep = qengine.memory_report(model)
print(json.dumps({"baseline_kib": base, "peak_kib": peak, "seconds": secs, "model_bytes": rep["total"]["bytes"]}))
"""


def write(path: str, layers: int, hidden: int, inter: int, vocab: int, heads: int) -> tuple[int, int]:
    """A Llama GGUF: q, k, o Q4_0 (gguf's quantizer), gate, up, down Q4_K and v Q6_K (random
    blocks with sane fp16 factors), token_embd Q4_0, output Q6_K, norms F32. Returns the file's
    largest tensor: (its stored bytes, its element count)."""
    import gguf

    T = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(2048)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_embedding_length(hidden)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(10000.0)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)

    def add(name, rows, cols, qtype):
        if qtype == T.F32:
            w.add_tensor(name, np.ones(cols, np.float32))
        elif qtype == T.Q4_0:
            w.add_tensor(name, gguf.quants.quantize(rng.standard_normal((rows, cols), np.float32) * 0.02, qtype),
                         raw_dtype=qtype)
        else:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            raw = rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
            b = raw.reshape(-1, size)
            f16 = np.full((b.shape[0],), 0.001, np.float16).view(np.uint8).reshape(-1, 2)
            if qtype == T.Q6_K:
                b[:, -2:] = f16
            else:
                b[:, 0:2], b[:, 2:4] = f16, f16
            w.add_tensor(name, raw, raw_dtype=qtype)

    add("token_embd.weight", vocab, hidden, T.Q4_0)
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", 1, hidden, T.F32)
        for key, qtype in (("q", T.Q4_0), ("k", T.Q4_0), ("v", T.Q6_K), ("output", T.Q4_0)):
            add(f"blk.{i}.attn_{key}.weight", hidden, hidden, qtype)
        add(f"blk.{i}.ffn_norm.weight", 1, hidden, T.F32)
        add(f"blk.{i}.ffn_gate.weight", inter, hidden, T.Q4_K)
        add(f"blk.{i}.ffn_up.weight", inter, hidden, T.Q4_K)
        add(f"blk.{i}.ffn_down.weight", hidden, inter, T.Q4_K)
    add("output_norm.weight", 1, hidden, T.F32)
    add("output.weight", vocab, hidden, T.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    largest = max(gguf.GGUFReader(path).tensors, key=lambda t: int(t.n_bytes))
    return int(largest.n_bytes), int(largest.n_elements)


def main() -> None:
    ap = H.bench_parser(__doc__, "gguf", "2 layers, hidden 1024, vocab 8192")
    H.add_llama_size_args(ap, vocab=32000)
    ap.set_defaults(layers=4, hidden=2048, intermediate=5632)
    ap.add_argument("--heads", type=int, default=16)
    args = ap.parse_args()
    if args.quick:
        args.layers, args.hidden, args.intermediate, args.vocab = 2, 1024, 2816, 8192
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path, warm = os.path.join(tmp, "model.gguf"), os.path.join(tmp, "warm", "warm.gguf")
        os.makedirs(os.path.dirname(warm))
        stored, elements = write(path, args.layers, args.hidden, args.intermediate, args.vocab, args.heads)
        write(warm, 1, 256, 512, 256, 4)
        size = os.path.getsize(path)
        target, target_f32 = size + 1.5 * stored, size + 1.5 * 4 * elements
        print(f"file {size / 2**20:.1f} MiB, largest tensor {stored / 2**20:.1f} MiB stored "
              f"({4 * elements / 2**20:.1f} MiB as float32); target: peak - baseline <= {target / 2**20:.1f} MiB "
              f"(float32 count: {target_f32 / 2**20:.1f} MiB)")
        print(f"{'load':<34}{'peak-base MiB':>14}{'model MiB':>11}{'x file':>8}{'seconds':>9}  target (f32 count)")
        for mode in ("qengine", "transformers"):
            out = subprocess.run([sys.executable, "-c", CHILD, path, warm, mode], capture_output=True, text=True,
                                 env={**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})})
            if out.returncode:
                print(f"{mode}: failed\n{out.stderr[-2000:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            used = (r["peak_kib"] - r["baseline_kib"]) * 1024
            label = {"qengine": "qengine load_model", "transformers": "transformers gguf_file= (float32)"}[mode]
            print(f"{label:<34}{used / 2**20:>14.1f}{r['model_bytes'] / 2**20:>11.1f}{used / size:>8.2f}"
                  f"{r['seconds']:>9.2f}  {'within' if used <= target else 'over'} "
                  f"({'within' if used <= target_f32 else 'over'})")
            rows.append({"mode": mode, "peak_minus_baseline_bytes": used, **r})
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"file_bytes": size, "largest_tensor_stored_bytes": stored,
                   "largest_tensor_float32_bytes": 4 * elements, "target_bytes": target, "target_float32_count_bytes": target_f32,
                   "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
