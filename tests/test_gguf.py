"""GGUF in and out (qengine.hf.gguf): a tiny Llama written by the gguf package (no download) with
Q4_0, Q8_0, Q4_1, Q4_K, Q5_K, Q6_K, IQ4_NL, MXFP4 and NVFP4 tensors -> load -> logits vs
transformers' own GGUF load -> QLoRA steps -> export -> read back; every decode against
gguf.quants.dequantize bit for bit; exported bytes against gguf.quants.quantize; bad files."""

import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import qengine  # noqa: E402
from qengine.cli import main  # noqa: E402
from qengine.hf import export_gguf, load_model, save_quantized  # noqa: E402
from qengine.hf.gguf import EXACT_TYPES, decode_blocks  # noqa: E402
from qengine.hf.gguf.codec import MICROSCALING_TYPES  # noqa: E402
from qengine.nn import QuantEmbedding, QuantLinear  # noqa: E402
from support import check_matmul_every_isa  # noqa: E402

T = gguf.GGMLQuantizationType
LAYER_TYPES = [dict(q=T.Q4_0, k=T.Q8_0, v=T.Q4_1, o=T.Q4_K, gate=T.Q5_K, up=T.Q4_K, down=T.Q6_K),
               dict(q=T.NVFP4, k=T.MXFP4, v=T.IQ4_NL, o=T.Q4_1, gate=T.Q4_0, up=T.Q5_K, down=T.Q4_K)]
DIMS = dict(hidden=256, inter=512, heads=4, kv=2, layers=2, vocab=288)


def random_blocks(rng, rows, cols, qtype):
    """Random bytes of a type the gguf package cannot quantize (K-quants, IQ4_NL, NVFP4), with sane
    fp16 factors (NVFP4: E4M3 block scales 2**-9 .. 0.06, subnormals included)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
    b = raw.reshape(-1, size)

    def f16(lo, hi):
        return np.frombuffer(rng.uniform(lo, hi, b.shape[0]).astype(np.float16).tobytes(), np.uint8).reshape(-1, 2)

    if qtype == T.Q6_K:
        b[:, -2:] = f16(0.0005, 0.002)
    elif qtype == T.IQ4_NL:  # a signed d, as Q4_0's
        b[:, 0:2] = f16(-0.0005, 0.0005)
    elif qtype == T.NVFP4:
        b[:, 0:4] = rng.integers(1, 25, (b.shape[0], 4))
    else:
        b[:, 0:2], b[:, 2:4] = f16(0.0005, 0.002), f16(0.0, 0.002)
    return raw


def weights(rng, rows, cols, qtype):
    if qtype in (T.Q4_0, T.Q4_1, T.Q8_0, T.Q5_0, T.MXFP4):
        return gguf.quants.quantize((rng.standard_normal((rows, cols)) * 0.05).astype(np.float32), qtype)
    return random_blocks(rng, rows, cols, qtype)


def write_llama(path, layer_types=LAYER_TYPES, output=T.Q6_K, seed=0, truncate=0, embd=T.F16):
    """A tiny Llama GGUF file; truncate > 0 cuts that many bytes off its end, < 0 keeps only -truncate bytes;
    output=None writes no output.weight (the head tied to token_embd)."""
    d = DIMS
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(os.fspath(path), "llama")
    for key, value in (("context_length", 128), ("block_count", d["layers"]), ("feed_forward_length", d["inter"]),
                       ("embedding_length", d["hidden"]), ("rope_dimension_count", d["hidden"] // d["heads"]),
                       ("rope_freq_base", 10000.0), ("head_count", d["heads"]), ("head_count_kv", d["kv"]),
                       ("layer_norm_rms_eps", 1e-5), ("vocab_size", d["vocab"])):
        getattr(w, "add_" + key)(value)

    def add(name, rows, cols, qtype):
        if qtype in (T.F32, T.F16):
            data = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32 if qtype == T.F32 else np.float16)
            w.add_tensor(name, data if rows > 1 else 1 + data.reshape(cols))
        else:
            w.add_tensor(name, weights(rng, rows, cols, qtype), raw_dtype=qtype)

    h, kvd = d["hidden"], d["kv"] * d["hidden"] // d["heads"]
    add("token_embd.weight", d["vocab"], h, embd)
    for i in range(d["layers"]):
        ty = layer_types[i % len(layer_types)]
        add(f"blk.{i}.attn_norm.weight", 1, h, T.F32)
        for key, rows, cols in (("q", h, h), ("k", kvd, h), ("v", kvd, h), ("output", h, h)):
            add(f"blk.{i}.attn_{key}.weight", rows, cols, ty[key[0]])
        add(f"blk.{i}.ffn_norm.weight", 1, h, T.F32)
        add(f"blk.{i}.ffn_gate.weight", d["inter"], h, ty["gate"])
        add(f"blk.{i}.ffn_up.weight", d["inter"], h, ty["up"])
        add(f"blk.{i}.ffn_down.weight", h, d["inter"], ty["down"])
    add("output_norm.weight", 1, h, T.F32)
    if output is not None:
        add("output.weight", d["vocab"], h, output)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if truncate:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - truncate if truncate > 0 else -truncate)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def reference_model(path):
    path = os.fspath(path)
    return transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                             dtype=torch.float32).eval()


@pytest.mark.parametrize("chunk", [None, 500], ids=["whole", "chunked"])
@pytest.mark.parametrize("name", list(EXACT_TYPES))
def test_decode_equals_gguf_dequantize(name, chunk, monkeypatch):
    """Bit for bit, decoded in one piece or a few blocks at a time (as the loader reads a file)."""
    if chunk is not None:
        monkeypatch.setattr("qengine.hf.gguf.codec.CHUNK_BYTES", chunk)
    qtype, rows, cols = T[name], 7, 512  # an odd row count
    raw = weights(np.random.default_rng(1), rows, cols, qtype)
    ours = decode_blocks(torch.from_numpy(raw.copy()).reshape(-1), name, (rows, cols)).dequantize(torch.float32).numpy()
    ref = gguf.quants.dequantize(raw, qtype)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))  # bit for bit, signed zeros included


@pytest.mark.parametrize("name, cols", [("Q8_0", 2880), ("Q6_K", 512), ("Q5_K", 768), ("Q4_K", 512), ("Q4_1", 2880)])
def test_matmul_every_isa(name, cols):
    """The matmul of each 8-bit-coded type (Q8_0, Q6_K and Q5_K load to 8-bit tables, the fused
    GEMV on a VBMI CPU; from 8 rows Q8_0 and Q6_K's block 16 on the amx row's tiles, from 17 on
    the avx512_bf16 row's panels) and the 4-bit minmax ones on every ISA, against the float64
    product with gguf.quants.dequantize's weights; 2880 columns leave a last chunk of 64 codes."""
    raw = weights(np.random.default_rng(4), 70, cols, T[name])
    q = decode_blocks(torch.from_numpy(raw.copy()).reshape(-1), name, (70, cols))
    w64 = torch.from_numpy(gguf.quants.dequantize(raw, T[name])).to(torch.float64)
    for m in (1, 5, 9, 20):
        check_matmul_every_isa(q, w64, torch.randn(m, cols, dtype=torch.bfloat16))


@pytest.mark.parametrize("name, scale_bytes, bad", [
    ("MXFP4", [0, 1, 2, 3, 100, 127, 128, 200, 253, 254], [0xFF]),  # 2**-127 (subnormal results) .. 2**127 (Inf)
    ("NVFP4", list(range(127)) + [0], [0x7F, 0x80, 0xFE, 0xFF]),  # every E4M3 scale, subnormals included
], ids=["mxfp4", "nvfp4"])
def test_fp4_every_code_and_scale_byte(name, scale_bytes, bad):
    """Every E2M1 code (-0 included, which gguf decodes as +0) under every edge scale byte equals
    gguf.quants.dequantize bit for bit (Inf where gguf overflows too); a scale byte with no value
    is a ValueError naming it."""
    c, per = np.arange(16, dtype=np.uint8), 1 if name == "MXFP4" else 4  # per: scale bytes a GGUF block
    # All 16 codes in each half block (MXFP4: low nibbles elements j, high j + 16; NVFP4: per 16, 0..7 and 8..15).
    qs = c | c[::-1] << 4 if per == 1 else np.concatenate([c[:8] | c[8:] << 4, c[8:] | c[:8] << 4] * 2)
    raw = np.concatenate([np.reshape(scale_bytes, (-1, per)).astype(np.uint8),
                          np.tile(qs, (len(scale_bytes) // per, 1))], axis=1).reshape(2, -1)
    shape = (2, len(scale_bytes) * (16 if per == 1 else 8))
    q = decode_blocks(torch.from_numpy(raw.copy()).reshape(-1), name, shape)
    with np.errstate(over="ignore"):
        ref = gguf.quants.dequantize(raw, T[name])
    assert q.format.name == name.lower() and np.array_equal(q.dequantize(torch.float32).numpy().view(np.uint32),
                                                            ref.view(np.uint32))
    for byte in bad:
        raw[1, 0] = byte
        with pytest.raises(ValueError, match=f"{name} tensor has an? (E8M0|UE4M3) block scale byte.*corrupt"):
            decode_blocks(torch.from_numpy(raw.copy()).reshape(-1), name, shape)


def test_load_logits_equal_transformers(tiny, caplog):
    torch.manual_seed(0)
    with caplog.at_level("WARNING", logger="qengine"):
        model = load_model(tiny)
    assert "no exact qengine layout" not in caplog.text  # every quantized type loads exactly
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, QuantLinear) and attn.q_proj.format.name == "_gguf_q4_0"
    assert model.model.layers[0].mlp.gate_proj.format.name == "_gguf_u5"
    down = model.model.layers[0].mlp.down_proj  # Q6_K: 8-bit codes, a float32 scale per 16
    assert isinstance(down, QuantLinear) and down.format.name == "_gguf_q6" and down.blocksize == 16
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.format.name == "_gguf_q6"
    attn = model.model.layers[1].self_attn  # NVFP4 / MXFP4 in qengine's own formats, q/k rows permuted
    assert (attn.q_proj.format.name, attn.q_proj.blocksize, attn.k_proj.format.name) == ("nvfp4", 16, "mxfp4")
    assert attn.v_proj.format.name == "_gguf_iq4_nl"
    ref = reference_model(tiny)
    ids = torch.randint(0, DIMS["vocab"], (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def _tensors(path):
    r = gguf.GGUFReader(os.fspath(path))
    return r, {t.name: t for t in r.tensors}


def test_qlora_then_export_reads_back(tiny, tmp_path):
    torch.manual_seed(0)
    model = load_model(tiny)
    qengine.add_lora(model, r=4, target_modules=["q_proj", "v_proj", "up_proj"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, DIMS["vocab"], (2, 16))
    losses = []
    for _ in range(4):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    out = tmp_path / "out.gguf"
    report = export_gguf(model, out, type="q4_0")
    assert set(report["merged"]) == {f"model.layers.{i}.{m}" for i in range(2)
                                     for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")}
    assert all(0 < e < 0.2 for e in report["merged"].values())
    src, _ = _tensors(tiny)
    back, tensors = _tensors(out)
    for key in ("llama.block_count", "llama.embedding_length", "llama.attention.head_count_kv",
                "llama.feed_forward_length", "llama.rope.freq_base", "llama.vocab_size"):
        assert back.fields[key].contents() == pytest.approx(src.fields[key].contents())
    # The written bytes are gguf's quantizer on the merged float weight, in llama.cpp's row order.
    merged = model.model.layers[0].self_attn.q_proj.merged_linear().weight.detach()
    h = DIMS["hidden"]
    perm = torch.from_numpy(np.arange(h).reshape(DIMS["heads"], 2, -1).swapaxes(1, 2).reshape(h).copy())
    expect = gguf.quants.quantize(merged[perm].numpy(), T.Q4_0)
    assert np.array_equal(np.asarray(tensors["blk.0.attn_q.weight"].data), expect)
    # And it loads again, in qengine and in transformers, to the same logits.
    again = load_model(out)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, reference_model(out)(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("type_name", ["q4_0", "q4_1", "q8_0", "mxfp4"])
def test_export_bytes_equal_gguf_quantize(tiny, tmp_path, type_name):
    model = load_model(tiny)
    out = tmp_path / "x.gguf"
    assert main(["export", os.fspath(tiny), os.fspath(out), "--type", type_name]) == 0
    src, src_tensors = _tensors(tiny)
    _, tensors = _tensors(out)
    qtype = T[type_name.upper()]
    for name in ("blk.0.attn_k.weight", "blk.1.ffn_up.weight", "blk.0.ffn_down.weight"):
        dense = gguf.quants.dequantize(np.asarray(src_tensors[name].data), src_tensors[name].tensor_type)
        assert np.array_equal(np.asarray(tensors[name].data), gguf.quants.quantize(dense, qtype)), name
    assert "output.weight" in tensors and tensors["output_norm.weight"].tensor_type == T.F32
    del model


def test_mxfp4_model_exports_to_mxfp4_without_loss(tiny, tmp_path):
    """A model quantized to qengine's mxfp4 (OCP MX rules) and exported as GGUF MXFP4 decodes, in
    the gguf package, to exactly the values qengine holds: the same E8M0 exponents and E2M1 codes."""
    model = reference_model(tiny)
    qengine.quantize_model(model, format="mxfp4", progress=False)
    out = tmp_path / "mx.gguf"
    export_gguf(model, out, type="mxfp4")
    _, tensors = _tensors(out)
    assert tensors["blk.1.ffn_up.weight"].tensor_type == T.MXFP4
    up = model.model.layers[1].mlp.up_proj
    decoded = gguf.quants.dequantize(np.asarray(tensors["blk.1.ffn_up.weight"].data), T.MXFP4)
    assert np.array_equal(decoded.reshape(up.out_features, up.in_features), up.dequantize(torch.float32).numpy())


def test_unknown_tensor_type_or_corrupt_scale(tmp_path):
    """An unsupported type, and an MXFP4 block scale byte 0xFF (E8M0's NaN), name the tensor."""
    path = write_llama(tmp_path / "q2k.gguf", [dict(LAYER_TYPES[0], o=T.Q2_K)])
    with pytest.raises(ValueError, match=r"blk\.0\.attn_output\.weight.*Q2_K.*supported: Q4_0"):
        load_model(path)
    path = write_llama(tmp_path / "bad.gguf")
    t = _tensors(path)[1]["blk.1.attn_k.weight"]
    with open(path, "r+b") as f:
        f.seek(int(t.data_offset) + 17 * 5)  # the E8M0 byte of MXFP4 block 5
        f.write(b"\xff")
    with pytest.raises(ValueError, match=r"'blk\.1\.attn_k\.weight'.*E8M0 block scale byte 0xFF"):
        load_model(path)


@pytest.mark.parametrize("cut", [1000, -300], ids=["tensor-data", "header"])  # -n: keep only n bytes
def test_truncated_file(tmp_path, cut):
    path = write_llama(tmp_path / "cut.gguf", truncate=cut)
    with pytest.raises(ValueError, match="truncated|not a readable GGUF"):
        load_model(path)


def test_export_refuses_other_types_and_architectures(tiny, tmp_path):
    model = load_model(tiny)
    with pytest.raises(ValueError, match="q3_k.*q4_0"):
        export_gguf(model, tmp_path / "k.gguf", type="q3_k")
    model.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="supports llama"):
        export_gguf(model, tmp_path / "g.gguf")


def test_loaded_gguf_saves_and_reloads_without_requantizing(tiny, tmp_path):
    """A model loaded from GGUF (signed Q4_0/Q8_0 block scales included) saves as a qengine
    checkpoint and loads back with identical logits."""
    from qengine.hf import save_quantized

    model = load_model(tiny)
    save_quantized(model, tmp_path / "saved")
    again = load_model(tmp_path / "saved")
    ids = torch.randint(0, DIMS["vocab"], (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_cli_generate_and_finetune_take_a_gguf_file(tiny, tmp_path, capsys):
    """`qengine generate` and `qengine finetune` accept a .gguf path for --model (the byte
    tokenizer when the file carries none, as for a directory without tokenizer files)."""
    assert main(["generate", "--model", os.fspath(tiny), "--prompt", "ab", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("ab")
    data = tmp_path / "data.txt"
    data.write_text("the cat sat on the mat. " * 40)
    out = tmp_path / "run"
    assert main(["finetune", "--model", os.fspath(tiny), "--data", os.fspath(data), "--out", os.fspath(out),
                 "--steps", "2", "--seq-len", "16", "--batch", "2", "--rank", "4"]) == 0
    assert (out / "adapter.safetensors").is_file()
    assert main(["generate", "--model", os.fspath(tmp_path / "missing.gguf"), "--prompt", "a"]) == 2


def _bits(t):
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("name", [n for n in EXACT_TYPES if n not in MICROSCALING_TYPES])
def test_quant_embedding_equals_decode_then_index(name):
    """A lookup decodes only the requested rows, bit for bit the rows of the whole decoded table
    (repeated indices, an odd vocabulary, any index shape, float32 and bfloat16 outputs)."""
    rng = np.random.default_rng(2)
    rows, cols = 37, 512
    raw = weights(rng, rows, cols, T[name])
    q = decode_blocks(torch.from_numpy(raw.copy()).reshape(-1), name, (rows, cols))
    emb = QuantEmbedding.from_quantized(q)
    ids = torch.tensor([[0, 36, 5, 5], [36, 0, 17, 5]])
    full = torch.from_numpy(gguf.quants.dequantize(raw, T[name]))
    assert torch.equal(_bits(emb(ids)), _bits(full[ids]))
    assert torch.equal(_bits(emb(ids.int()[0])), _bits(full[ids[0]]))
    assert emb(torch.zeros(0, dtype=torch.long)).shape == (0, cols)
    emb.to(torch.bfloat16)  # the output dtype follows; the stored scales are not rounded
    assert emb.weight_scales.dtype == torch.float32
    assert torch.equal(_bits(emb(ids)), _bits(q.dequantize(torch.bfloat16)[ids]))


def test_quant_embedding_rejects_bad_indices():
    q = decode_blocks(torch.from_numpy(weights(np.random.default_rng(3), 5, 64, T.Q8_0).copy()).reshape(-1), "Q8_0",
                      (5, 64))
    emb = QuantEmbedding.from_quantized(q)
    for bad in ([0, 5], [-1, 2]):
        with pytest.raises(IndexError, match=r"out of range for an embedding of 5 rows"):
            emb(torch.tensor(bad))
    with pytest.raises(TypeError, match="integer indices"):
        emb(torch.tensor([0.0, 1.0]))
    with pytest.raises(RuntimeError, match="holds no table"):
        QuantEmbedding(5, 64)(torch.tensor([0]))


@pytest.fixture(scope="module")
def tiny_qembd(tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp("gguf") / "qembd.gguf", embd=T.Q4_K)


def test_quantized_token_embd_stays_quantized(tiny_qembd, tmp_path):
    """A Q4_K token_embd loads as a QuantEmbedding (the model's input embeddings), with logits equal
    transformers' float load; it saves and reloads with identical logits, and QLoRA steps run."""
    torch.manual_seed(0)
    model = load_model(tiny_qembd)
    emb = model.get_input_embeddings()
    assert isinstance(emb, QuantEmbedding) and emb.format.name == "_gguf_u4"
    assert qengine.memory_report(model)["embedding"]["bytes"] == emb.weight_nbytes
    ids = torch.randint(0, DIMS["vocab"], (2, 11))
    with torch.no_grad():
        logits = model(ids).logits
        torch.testing.assert_close(logits, reference_model(tiny_qembd)(ids).logits, rtol=1e-5, atol=1e-5)
    save_quantized(model, tmp_path / "saved")
    again = load_model(tmp_path / "saved")
    assert isinstance(again.get_input_embeddings(), QuantEmbedding)
    with pytest.raises(ValueError, match="quantized embeddings.*qengine.hf.load_model"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)
    qengine.add_lora(model, r=4, target_modules=["q_proj", "v_proj", "up_proj"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(2):  # the frozen table has no parameters: the adapters train around it
        loss = model(ids, labels=ids).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert not list(emb.parameters()) and all(not torch.equal(a, p) for a, p in zip(before, trainable))
    out = tmp_path / "out.gguf"
    export_gguf(model, out, type="q8_0")
    _, tensors = _tensors(out)
    src = _tensors(tiny_qembd)[1]["token_embd.weight"]
    dense = gguf.quants.dequantize(np.asarray(src.data), src.tensor_type)
    assert np.array_equal(np.asarray(tensors["token_embd.weight"].data), gguf.quants.quantize(dense, T.Q8_0))


@pytest.mark.parametrize("embd, output", [(T.Q4_0, None), (T.MXFP4, T.Q6_K), (T.NVFP4, T.Q6_K)],
                         ids=["tied", "mxfp4", "nvfp4"])
def test_float_embedding_when_tied_or_microscaling(tmp_path, embd, output):
    """With no output.weight the head is tied to token_embd, and an MXFP4 / NVFP4 token_embd has
    nested scale codes (which QuantEmbedding does not gather): either way the embedding is decoded
    to float32, bit for bit transformers' table, and the logits equal transformers'."""
    path = write_llama(tmp_path / "embd.gguf", output=output, embd=embd)
    model, ref = load_model(path), reference_model(path)
    if output is None and not model.config.tie_word_embeddings:
        pytest.skip("transformers' GGUF config does not tie the head of a file without output.weight")
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    assert torch.equal(model.get_input_embeddings().weight, ref.get_input_embeddings().weight)
    assert output is not None or model.lm_head.weight is model.get_input_embeddings().weight
    torch.manual_seed(0)
    ids = torch.randint(0, DIMS["vocab"], (2, 11))  # as test_load_logits_equal_transformers
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fallback", ["float32", "int8"])
def test_fallback_for_a_type_without_exact_layout(tiny, monkeypatch, caplog, fallback):
    """`fallback=` still serves a quantized Linear type with no exact layout (none today: Q6_K is
    made one here by hiding its layout), with the warning naming the tensors."""
    import qengine.hf.gguf.load as gguf_load

    monkeypatch.setattr(gguf_load, "EXACT_TYPES", {k: v for k, v in EXACT_TYPES.items() if k != "Q6_K"})
    monkeypatch.setattr(gguf_load, "FALLBACK_TYPES", ("Q6_K",))
    with caplog.at_level("WARNING", logger="qengine"):
        model = load_model(tiny, fallback=fallback)
    assert "blk.0.ffn_down.weight (Q6_K)" in caplog.text and "output.weight (Q6_K)" in caplog.text
    down = model.model.layers[0].mlp.down_proj
    if fallback == "float32":
        assert type(down) is torch.nn.Linear
        torch.manual_seed(0)
        ids = torch.randint(0, DIMS["vocab"], (2, 11))
        with torch.no_grad():  # float rounding of the kernels' sums against torch's
            torch.testing.assert_close(model(ids).logits, reference_model(tiny)(ids).logits, rtol=1e-4, atol=1e-4)
    else:
        assert isinstance(down, QuantLinear) and down.format.name == "int8"
