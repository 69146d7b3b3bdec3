#!/usr/bin/env python
"""PyTorch CPU reference for the `tiny` preset of bench_kd.py: the same shapes and objective, done the way
peer tools do it (HF transformers + PEFT LoRA on q,k,v,o, full-vocabulary logits, float32).

    pip install torch==2.13.0 peft   # benchmark-only; not a project dependency
    python benchmarks/bench_torch_cpu.py [--steps 3]
"""

import argparse
import json
import time

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: PyTorch's choice)")
args = ap.parse_args()

import torch  # noqa: E402  (after --help, which works without PyTorch)
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

if args.threads:
    torch.set_num_threads(args.threads)
V, B, T, temp, alpha = 8192, 4, 256, 2.0, 0.7
torch.manual_seed(0)
tcfg = LlamaConfig(vocab_size=V, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=4, tie_word_embeddings=True)
scfg = LlamaConfig(vocab_size=V, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=True)
for c in (tcfg, scfg):
    c._attn_implementation = "sdpa"
teacher = LlamaForCausalLM(tcfg).eval()
student = get_peft_model(LlamaForCausalLM(scfg), LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
x = torch.randint(0, V, (B, T))


def step():
    with torch.no_grad():
        tl = teacher(x).logits
    sl = student(x).logits
    t = torch.log_softmax(tl.float() / temp, -1)
    s = torch.log_softmax(sl.float() / temp, -1)
    kd = (t.exp() * (t - s)).sum(-1).mean() * temp**2
    ce = torch.nn.functional.cross_entropy(sl[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
    loss = alpha * kd + (1 - alpha) * ce
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


step()
t0 = time.perf_counter()
for _ in range(args.steps):
    loss = step()
dt = (time.perf_counter() - t0) / args.steps
print(json.dumps({"impl": "torch-cpu", "torch": torch.__version__, "threads": torch.get_num_threads(), "B": B, "T": T,
                  "step_s": round(dt, 4), "tok_s": round(B * T / dt, 1), "loss": round(loss, 4)}))
