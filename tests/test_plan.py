"""qengine.plan: per-layer settings under a bits-per-parameter budget (exact, deterministic),
quantize_model(plan=...), and planned checkpoints that reload without re-quantizing."""

from __future__ import annotations

import itertools

import pytest
import torch

import qengine
from qengine.calibrate.plan import FLOAT16, Candidate, Plan, choose
from qengine.nn import QuantLinear
from support import Tiny

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the hf extra)")
import qengine.hf  # noqa: E402

CANDS = [Candidate("nf4", 128, True, "rtn"), Candidate("nf4", 32, True, "gptq"), Candidate("int8", 64, True, "rtn"),
         FLOAT16]


def _tiny():
    torch.manual_seed(0)
    return Tiny(vocab=64, d=64, h=128).eval(), torch.randint(0, 64, (8, 32))


def _llama(vocab=128):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_choose_is_the_exact_optimum_on_small_instances():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        costs = [sorted(torch.randint(10, 200, (3,), generator=g).tolist()) for _ in range(4)]
        damages = [sorted(torch.rand(3, generator=g).tolist(), reverse=True) for _ in range(4)]
        cap = sum(c[0] for c in costs) + int(torch.randint(0, 300, (1,), generator=g))
        sel = choose(costs, damages, cap)
        assert sum(c[k] for c, k in zip(costs, sel)) <= cap
        best = min(sum(d[k] for d, k in zip(damages, ks)) for ks in itertools.product(range(3), repeat=4)
                   if sum(c[k] for c, k in zip(costs, ks)) <= cap)
        assert sum(d[k] for d, k in zip(damages, sel)) == pytest.approx(best)


@pytest.mark.parametrize("budget", [5.3, 7.0])
def test_plan_respects_the_budget_in_stored_bytes_and_is_deterministic(budget):
    model, ids = _tiny()
    p = qengine.plan(model, ids, budget=budget, candidates=CANDS)
    again = qengine.plan(model, ids, budget=budget, candidates=CANDS)
    assert p.entries == again.entries and p.bytes == again.bytes
    assert 8 * p.bytes <= budget * p.params and p.bits_per_param <= budget
    assert set(p.entries) == {"layers.0.up_proj", "layers.0.down_proj", "layers.1.up_proj", "layers.1.down_proj"}
    qengine.quantize_model(model, plan=p, calibration=ids, progress=False)
    stored = sum(m.quantized().nbytes for m in model.modules() if isinstance(m, QuantLinear))
    floats = sum(2 * model.get_submodule(n).weight.numel() for n, c in p.entries.items() if c == FLOAT16)
    assert stored + floats == p.bytes  # the plan counted exactly what is stored
    for n, c in p.quantized().items():
        mod = model.get_submodule(n)
        assert (mod.format.name, mod.blocksize, mod.double_quant) == (c.format, c.blocksize, c.double_quant)
    assert Plan.from_dict(p.to_dict()).entries == p.entries
    assert "bits per parameter" in str(p)


def test_a_larger_budget_never_plans_more_damage():
    model, ids = _tiny()
    damage = [sum(qengine.plan(model, ids, budget=b, candidates=CANDS, sensitivity="output").damage.values())
              for b in (5.2, 6.0, 9.0)]
    assert damage[0] >= damage[1] >= damage[2]


def test_planned_llama_saves_and_reloads_identical_without_requantizing(tmp_path, monkeypatch):
    model = _llama()
    ids = torch.randint(0, 128, (4, 32))
    p = qengine.plan(model, ids, budget=6.5, candidates=CANDS[:3], sensitivity="output")
    qengine.quantize_model(model, plan=p, calibration=ids, progress=False)
    kinds = {(m.format.name, m.blocksize) for m in model.modules() if isinstance(m, QuantLinear)}
    assert len(kinds) > 1  # really mixed
    with torch.no_grad():
        want = model(ids).logits
    qengine.hf.save_quantized(model, tmp_path / "a")
    qengine.hf.mark_quantized(model)
    model.save_pretrained(tmp_path / "b")

    def boom(*a, **k):
        raise AssertionError("re-quantized while loading")
    monkeypatch.setattr(qengine.hf.quantizer, "quantize", boom)
    monkeypatch.setattr(qengine.hf.quantizer, "search_scales", boom)
    for loaded in (qengine.hf.load_model(tmp_path / "a"),
                   transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b")):
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, want)
        for n, c in p.quantized().items():
            assert loaded.get_submodule(n).blocksize == c.blocksize


def test_from_pretrained_honours_a_plan(tmp_path):
    model = _llama()
    model.save_pretrained(tmp_path / "float")
    ids = torch.randint(0, 128, (4, 32))
    p = qengine.plan(model, ids, budget=6.5, candidates=CANDS[:1] + CANDS[2:3], sensitivity="output")
    cfg = qengine.hf.QEngineConfig(plan=p)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=cfg)
    ref = qengine.quantize_model(_llama(), plan=p, progress=False)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref(ids).logits)


def test_bad_input_is_refused_clearly(tmp_path):
    model, ids = _tiny()
    with pytest.raises(ValueError, match="budget"):
        qengine.plan(model, ids, budget=-1)
    with pytest.raises(ValueError, match="below the cheapest"):
        qengine.plan(model, ids, budget=2.0, candidates=CANDS)
    with pytest.raises(ValueError, match="calibration"):
        qengine.plan(model, None)
    with pytest.raises(ValueError, match="sensitivity"):
        qengine.plan(model, ids, sensitivity="vibes")
    with pytest.raises(ValueError, match="format"):
        qengine.plan(model, ids, candidates=[{"format": "nf3"}])
    p = qengine.plan(model, ids, budget=5.5, candidates=CANDS[:2], sensitivity="output")
    with pytest.raises(ValueError, match="calibration"):
        qengine.quantize_model(_tiny()[0], plan=Plan({n: CANDS[1] for n in p.entries}), progress=False)
    with pytest.raises(ValueError, match="does not name"):
        qengine.quantize_model(_tiny()[0], plan=Plan({"layers.0.up_proj": CANDS[0]}), progress=False)
    with pytest.raises(ValueError, match="does not have"):
        qengine.quantize_model(_tiny()[0], plan=Plan({"nope": CANDS[0]}), progress=False)
    llama = _llama()
    llama.save_pretrained(tmp_path)
    gptq_plan = {n: CANDS[1].to_dict() for n in qengine.hf.checkpoint.quantizable_linears(llama, ["lm_head"])}
    with pytest.raises(ValueError, match="from_pretrained"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=qengine.hf.QEngineConfig(
            plan=gptq_plan))
    with pytest.raises(ValueError, match="plan entry"):
        qengine.hf.QEngineConfig(plan={"x": {"format": "nf3"}})


def test_cli_plan_quantize_and_eval(tmp_path, capsys):
    from qengine.cli import main

    _llama(vocab=300).save_pretrained(tmp_path / "float")  # the byte tokenizer needs 259
    (tmp_path / "data.txt").write_text("The quick brown fox jumps over the lazy dog. " * 200)
    common = ["--calib-tokens", "1024"]
    assert main(["plan", str(tmp_path / "float"), "--data", str(tmp_path / "data.txt"), "--budget", "6.5", "--out",
                 str(tmp_path / "plan.json"), "--seq-len", "64", "--candidates", "nf4/128/dq/rtn,int8/64/dq/rtn",
                 "--sensitivity", "output", "--quiet", *common]) == 0
    assert "bits per parameter (budget 6.5)" in capsys.readouterr().out
    assert main(["quantize", str(tmp_path / "float"), str(tmp_path / "q"), "--plan", str(tmp_path / "plan.json"),
                 "--quiet"]) == 0
    loaded = qengine.hf.load_model(tmp_path / "q")
    p = Plan.load(tmp_path / "plan.json")
    assert {n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)} == set(p.quantized())
    assert main(["eval", str(tmp_path / "float"), "--data", str(tmp_path / "data.txt"), "--methods", "rtn", "--plan",
                 str(tmp_path / "plan.json"), "--seq-len", "64", "--quiet", *common]) == 0
    assert "\nplan " in capsys.readouterr().out
    assert main(["plan", str(tmp_path / "float"), "--data", str(tmp_path / "data.txt"), "--candidates", "nf4/x/dq/rtn",
                 "--out", str(tmp_path / "p2.json")]) == 2
