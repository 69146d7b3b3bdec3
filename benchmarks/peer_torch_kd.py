# ruff: noqa  (the peer's script, kept in its authors' style)
"""The PyTorch peer for KD-step benchmarks: HF transformers + PEFT, full-vocabulary logits, as peer tools do it.
Run on the GPU machine (PyTorch is installed there): python3 peer_torch_kd.py [BATCH]. Prints one JSON line.
Shapes: teacher = Qwen2.5-1.5B, student = Qwen2.5-0.5B + LoRA r=16 (q,k,v,o), vocab 151936, seq 1024, bf16, random weights."""
import sys
if {"-h", "--help"} & set(sys.argv[1:]):
    sys.exit(print(__doc__))
import json, time, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from peft import LoraConfig, get_peft_model

V = 151936
B, T = int(sys.argv[1]) if len(sys.argv) > 1 else 8, 1024
mode = sys.argv[2] if len(sys.argv) > 2 else "naive"
temp, alpha = 2.0, 0.7
dev = "cuda"
torch.manual_seed(0)
tcfg = Qwen2Config(vocab_size=V, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                   num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)
scfg = Qwen2Config(vocab_size=V, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                   num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
for c in (tcfg, scfg):
    c._attn_implementation = "sdpa"
with torch.device(dev):
    teacher = Qwen2ForCausalLM(tcfg).to(torch.bfloat16).eval()
    student = Qwen2ForCausalLM(scfg).to(torch.bfloat16)
student = get_peft_model(student, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
x = torch.randint(0, V, (B, T), device=dev)

def kd_naive(tl, sl):
    t = torch.log_softmax(tl.float() / temp, -1)
    s = torch.log_softmax(sl.float() / temp, -1)
    kd = (t.exp() * (t - s)).sum(-1).mean() * temp**2
    ce = torch.nn.functional.cross_entropy(sl[:, :-1].float().reshape(-1, V), x[:, 1:].reshape(-1))
    return alpha * kd + (1 - alpha) * ce

def step():
    with torch.no_grad():
        tl = teacher(x).logits
    sl = student(x).logits
    loss = kd_naive(tl, sl)
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    return loss

for _ in range(2):
    step()
torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
n = 6; t0 = time.time()
for _ in range(n):
    l = step()
torch.cuda.synchronize(); dt = (time.time() - t0) / n
# teacher-only forward time
t0 = time.time()
with torch.no_grad():
    for _ in range(n):
        teacher(x).logits
torch.cuda.synchronize(); tf = (time.time() - t0) / n
nt = sum(p.numel() for p in teacher.parameters()); ns = sum(p.numel() for p in student.parameters())
flops = B * T * (2 * nt + 4 * ns)
print(json.dumps(dict(impl="torch", B=B, T=T, step_s=round(dt, 4), tok_s=round(B * T / dt), teacher_fwd_s=round(tf, 4),
      peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2), tflops=round(flops / dt / 1e12, 1), loss=float(l),
      teacher_params=nt, student_params=ns)))
