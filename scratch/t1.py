import torch, tempfile, copy, os, json
import qengine
import transformers
from transformers import AutoModelForCausalLM
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
m = transformers.LlamaForCausalLM(cfg)
d = tempfile.mkdtemp()
m.save_pretrained(d + "/f")
ref = qengine.quantize_model(copy.deepcopy(m), progress=False).eval()
qm = AutoModelForCausalLM.from_pretrained(d + "/f", quantization_config=qengine.hf.QEngineConfig(format="nf4"))
print(type(qm.model.layers[0].self_attn.q_proj))
ids = torch.randint(0, 128, (2, 9))
with torch.no_grad():
    a = ref(ids).logits; b = qm(ids).logits
print("same as quantize_model:", torch.equal(a, b))
qm.save_pretrained(d + "/q")
print(os.listdir(d + "/q"), json.load(open(d + "/q/config.json"))["quantization_config"])
r = AutoModelForCausalLM.from_pretrained(d + "/q")
print(type(r.model.layers[0].self_attn.q_proj))
with torch.no_grad():
    c = r(ids).logits
print("reload identical:", torch.equal(b, c))
l = qengine.hf.load_model(d + "/q")
with torch.no_grad():
    print("load_model identical:", torch.equal(l(ids).logits, b))
qengine.hf.quantize_checkpoint(d + "/f", d + "/cli", progress=False)
r2 = AutoModelForCausalLM.from_pretrained(d + "/cli")
with torch.no_grad():
    print("cli->from_pretrained identical:", torch.equal(r2(ids).logits, b))
