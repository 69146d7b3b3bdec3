#!/usr/bin/env python
"""Where the student's step goes on the GPU: Qwen2.5-0.5B shapes, forward / forward+backward, eager and
compiled, without LoRA, with our LoRA layer and with mlx-lm's, plus attention and MLP matmuls alone.

    python benchmarks/profile_student.py [--batch 8 --seq 1024]     # prints one JSON line per measurement
    python benchmarks/profile_student.py --kernels                  # + the compiled LoRA step's GPU kernels

--kernels needs PyTorch in the same process: its profiler (CUPTI) records every CUDA kernel the process
launches, MLX's included, and prints them grouped by name with their time per step. --lean-backward adds
the same step after `lean.lean_backward` (frozen norms without their weight gradient, SwiGLU recomputed).
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# isort: off
import conch_dna  # noqa: E402,F401  (optimized BLAS before mlx)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
# isort: on
from benchmarks.bench_kd import PRESETS, build, kernel_table  # noqa: E402
from conch_dna.training.kd import KDConfig  # noqa: E402
from conch_dna.training.kd.lean import lean_backward
from conch_dna.training.kd.trainer import apply_lora

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--seq", type=int, default=1024)
ap.add_argument("--kernels", action="store_true", help="profile the compiled LoRA step's kernels (needs torch)")
ap.add_argument("--lean-backward", choices=["norms", "mlps", "all"],
                help="also time the step with lean.lean_backward (its norm part, its MLP part, or both)")
ap.add_argument("--only-lora", action="store_true", help="skip the measurements without LoRA and the pieces")
args = ap.parse_args()
B, L = args.batch, args.seq
_, s_shape, vocab, _, _ = PRESETS["qwen2.5-1.5b->0.5b"]
D, DTYPE = s_shape["hidden"], (mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32)  # float32 on a CPU
mx.random.seed(0)
student = build(s_shape, vocab, DTYPE)
tokens = mx.random.randint(0, vocab, (B, L))
cotangent = mx.random.normal((B, L, D)).astype(DTYPE)


def timeit(name, f, n=10):
    for _ in range(3):
        mx.eval(f())
    mx.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        mx.eval(f())
    mx.synchronize()
    print(json.dumps({"name": name, "ms": round((time.perf_counter() - t0) / n * 1000, 2)}), flush=True)


def rel_diff(a, b):
    return float(mx.linalg.norm((a - b).astype(mx.float32)) / mx.maximum(mx.linalg.norm(b.astype(mx.float32)), 1e-30))


def blocks(e):
    h = e
    for layer in student.model.layers:
        h = layer(h, "causal", None)
    return student.model.norm(h)


def loss(model):
    return (model.model(tokens) * cotangent).astype(mx.float32).sum()


def sdpa_sum(q, k, v):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal").astype(mx.float32).sum()


emb = student.model.embed_tokens(tokens)
if not args.only_lora:
    timeit("fwd no lora, eager", lambda: blocks(emb))
    compiled_blocks = mx.compile(blocks)
    timeit("fwd no lora, compiled", lambda: compiled_blocks(emb))
    input_grad = mx.compile(lambda e: mx.vjp(blocks, [e], [cotangent])[1][0])
    timeit("fwd+bwd no lora (input gradient), compiled", lambda: input_grad(emb))
apply_lora(student, KDConfig(lora={"rank": 16, "scale": 2.0, "keys": ["self_attn.q_proj", "self_attn.k_proj",
                                                                     "self_attn.v_proj", "self_attn.o_proj"]}))


def lora_step():
    value_and_grad = nn.value_and_grad(student, loss)
    state = [student.state]
    return value_and_grad, mx.compile(lambda: value_and_grad(student), inputs=state, outputs=state)


value_and_grad, compiled = lora_step()
reference = compiled()
timeit("fwd+bwd lora r16 q,k,v,o (conch layer), compiled", compiled)
if args.kernels:
    kernel_table("fwd+bwd lora r16 q,k,v,o (conch layer), compiled", compiled)
if args.lean_backward:
    lean_backward(student, norms=args.lean_backward != "mlps", mlps=args.lean_backward != "norms")
    _, compiled_lean = lora_step()
    lean_grads = compiled_lean()[1]
    err = max(rel_diff(a, b) for (_, a), (_, b) in zip(tree_flatten(lean_grads), tree_flatten(reference[1])))
    print(json.dumps({"name": "lean_backward vs plain: largest relative gradient difference", "value": err}), flush=True)
    timeit(f"fwd+bwd lora r16 q,k,v,o (conch layer), lean_backward {args.lean_backward}, compiled", compiled_lean)
    if args.kernels:
        kernel_table(f"lean_backward {args.lean_backward}", compiled_lean)
if args.only_lora:
    sys.exit(0)
from mlx_lm.tuner.lora import LoRALinear  # noqa: E402

for m in student.modules():
    if isinstance(m, LoRALinear):
        m.__class__ = LoRALinear
value_and_grad, compiled = lora_step()
timeit("fwd+bwd lora r16 q,k,v,o (mlx-lm layer), eager", lambda: value_and_grad(student))
timeit("fwd+bwd lora r16 q,k,v,o (mlx-lm layer), compiled", compiled)
q = mx.random.normal((B, 14, L, 64)).astype(DTYPE)
k = mx.random.normal((B, 2, L, 64)).astype(DTYPE)
timeit("sdpa fwd+bwd x 24 blocks", lambda: [mx.grad(sdpa_sum, argnums=(0, 1, 2))(q, k, k) for _ in range(24)])
x = mx.random.normal((B * L, D)).astype(DTYPE)
w = mx.random.normal((s_shape["inter"], D)).astype(DTYPE)
timeit("MLP-sized matmul x 72 (the MLPs' forward + input-gradient matmuls)", lambda: [x @ w.T for _ in range(72)])
