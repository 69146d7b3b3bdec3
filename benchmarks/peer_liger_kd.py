# ruff: noqa  (the peer's script, kept in its authors' style)
"""The strongest PyTorch KD peer we can build here: HF transformers + PEFT LoRA, Liger's fused Triton kernels
(RMSNorm, RoPE, SwiGLU) and Liger's chunked fused-linear distillation loss (LigerFusedLinearJSDLoss, beta=0 =
forward KL, never materialises [B, T, V] logits), optionally torch.compile and HF gradient checkpointing.
Same shapes as peer_torch_kd.py: teacher Qwen2.5-1.5B, student Qwen2.5-0.5B + LoRA r=16 (q,k,v,o), V=151936,
seq 1024, bf16, random weights.
Run on the GPU machine with the liger-kernel wheel (0.8.5, pure Python + Triton) carried there:
  python3 peer_liger_kd.py BATCH [ckpt] [chunk=N] [nopatch] [compile] [teacher=3b]  -> one JSON line.
(`compile` failed there with Liger's patched model: torch.compile cannot trace its Triton RoPE.)
`teacher=3b` swaps the teacher for Qwen2.5-3B's shapes (36 blocks, width 2048, MLP 11008, 16 heads, 2 KV
heads, tied), for `bench_kd.py --preset 'qwen2.5-3b->0.5b'`."""
import sys
if {"-h", "--help"} & set(sys.argv[1:]):
    sys.exit(print(__doc__))
import json, time, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from peft import LoraConfig, get_peft_model
from liger_kernel.transformers import apply_liger_kernel_to_qwen2
from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

V = 151936
B, T = int(sys.argv[1]) if len(sys.argv) > 1 else 8, 1024
ckpt = "ckpt" in sys.argv[2:]
comp = "compile" in sys.argv[2:]
chunk = next((int(a.split("=")[1]) for a in sys.argv[2:] if a.startswith("chunk=")), 1024)
temp, alpha = 2.0, 0.7
dev = "cuda"
torch.manual_seed(0)
if "nopatch" not in sys.argv[2:]:
    apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
teacher_3b = "teacher=3b" in sys.argv[2:]
if teacher_3b:
    tcfg = Qwen2Config(vocab_size=V, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True)
else:
    tcfg = Qwen2Config(vocab_size=V, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)
scfg = Qwen2Config(vocab_size=V, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                   num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
for c in (tcfg, scfg):
    c._attn_implementation = "sdpa"
with torch.device(dev):
    teacher = Qwen2ForCausalLM(tcfg).to(torch.bfloat16).eval()
    student = Qwen2ForCausalLM(scfg).to(torch.bfloat16)
if ckpt:
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.enable_input_require_grads()
student = get_peft_model(student, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
x = torch.randint(0, V, (B, T), device=dev)
labels = torch.cat([x[:, 1:], torch.full((B, 1), -100, device=dev)], 1).reshape(-1)
loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=1 - alpha, weight_soft_loss=alpha, beta=0.0,
                                  temperature=temp, compiled=True, chunk_size=chunk)
s_body = student.base_model.model.model
t_body = teacher.model
if comp:
    s_body = torch.compile(s_body)
    t_body = torch.compile(t_body)
s_head = student.base_model.model.lm_head.weight
t_head = teacher.lm_head.weight


def step():
    with torch.no_grad():
        th = t_body(x).last_hidden_state
    sh = s_body(x).last_hidden_state
    loss = loss_fn(sh.reshape(-1, sh.shape[-1]), s_head, th.reshape(-1, th.shape[-1]), t_head, labels)
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    return loss


for _ in range(3):
    step()
torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
n = 6; t0 = time.time()
for _ in range(n):
    l = step()
torch.cuda.synchronize(); dt = (time.time() - t0) / n
nt = sum(p.numel() for p in teacher.parameters()); ns = sum(p.numel() for p in student.parameters())
flops = B * T * (2 * nt + 6 * ns)
print(json.dumps(dict(teacher="qwen2.5-3b" if teacher_3b else "qwen2.5-1.5b", impl="torch+liger" + ("+ckpt" if ckpt else "") + ("+compile" if comp else "") + ("-nopatch" if "nopatch" in sys.argv[2:] else ""), B=B, T=T,
      chunk=chunk, step_s=round(dt, 4), tok_s=round(B * T / dt), peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2),
      loss=float(l))))
