#!/usr/bin/env python
"""Time the KD training step: teacher forward + student forward/backward + optimizer.

    python scripts/bench_kd.py --preset tiny                      # CPU, reference and fused side by side
    python scripts/bench_kd.py --preset qwen2.5-1.5b->0.5b --batch 8 --impl fused    # on the GPU machine
    python scripts/bench_kd.py --preset smollm2 --real            # the real default pair (+ cache, generation)

Prints one JSON line per run (tokens/s, peak memory, step-time split, model FLOP utilisation) and a table.
Random weights of the preset's shapes unless --real. Shapes of `qwen2.5-1.5b->0.5b` match
../shared/bench/peer_torch_kd.py (LoRA r=16 on q,k,v,o; forward KL T=2 + CE, alpha 0.7; vocab 151936).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Order matters: conch_dna loads the optimized BLAS, which only works before mlx is imported.
# isort: off
import conch_dna  # noqa: E402,F401
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
# isort: on

PRESETS = {
    # name: (teacher shape, student shape, vocab, batch, seq)
    "tiny": (dict(layers=8, hidden=512, inter=1408, heads=8, kv=4), dict(layers=4, hidden=256, inter=704, heads=4, kv=2), 8192, 4, 256),
    "smollm2": (dict(layers=30, hidden=576, inter=1536, heads=9, kv=3), dict(layers=16, hidden=576, inter=1536, heads=9, kv=3), 49152, 4, 256),
    "qwen2.5-1.5b->0.5b": (dict(layers=28, hidden=1536, inter=8960, heads=12, kv=2, qwen=True),
                           dict(layers=24, hidden=896, inter=4864, heads=14, kv=2, qwen=True), 151936, 8, 1024),
}
PEER_LORA = {  # as in peer_torch_kd.py: r=16 on q, k, v, o
    "rank": 16, "scale": 2.0, "keys": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 tensor-core peak (SXM)


def build(shape: dict, vocab: int, dtype):
    from mlx_lm.models import llama, qwen2

    cfg = dict(hidden_size=shape["hidden"], num_hidden_layers=shape["layers"], intermediate_size=shape["inter"],
               num_attention_heads=shape["heads"], num_key_value_heads=shape["kv"], rms_norm_eps=1e-6,
               vocab_size=vocab, tie_word_embeddings=True, rope_theta=1e6 if shape.get("qwen") else 1e4,
               max_position_embeddings=32768)
    if shape.get("qwen"):
        model = qwen2.Model(qwen2.ModelArgs.from_dict({**cfg, "model_type": "qwen2"}))
    else:
        model = llama.Model(llama.ModelArgs.from_dict({**cfg, "model_type": "llama"}))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def n_params(model) -> int:
    from mlx.utils import tree_flatten

    return sum(p.size for _, p in tree_flatten(model.parameters()))


def run(args, impl: str) -> dict:
    from conch_dna.training.kd import KDConfig
    from conch_dna.training.kd.fused import TeacherStates, fused_objective, model_parts, teacher_hidden
    from conch_dna.training.kd.losses import kd_objective
    from conch_dna.training.kd.trainer import apply_lora

    t_shape, s_shape, vocab, batch, seq = PRESETS[args.preset]
    batch, seq = args.batch or batch, args.seq or seq
    gpu = mx.default_device() == mx.gpu
    dtype = mx.bfloat16 if gpu else mx.float32
    if args.real:
        from conch_dna.models import load_model

        teacher, _ = load_model("default-teacher", dtype=dtype)
        student, _ = load_model("default-student", dtype=dtype)
        vocab = 49152
    else:
        mx.random.seed(0)
        teacher, student = build(t_shape, vocab, dtype), build(s_shape, vocab, dtype)
    nt, ns = n_params(teacher), n_params(student)
    cfg = KDConfig(lora=PEER_LORA,
                   temperature=2.0, alpha=0.7, loss_chunk_size=args.chunk)
    apply_lora(student, cfg)
    if args.stock_lora:  # mlx-lm's own layer (float32 LoRA matmuls on bf16 activations), for comparison
        from mlx_lm.tuner.lora import LoRALinear

        for m in student.modules():
            if isinstance(m, LoRALinear):
                m.__class__ = LoRALinear
    compiled = impl == "fused" and (args.compile == "on" or (args.compile == "auto" and gpu))
    if args.grad_checkpoint:
        from conch_dna.training.kd.trainer import checkpoint_blocks

        if args.checkpoint_blocks is not None:  # only the first N blocks
            from types import SimpleNamespace

            checkpoint_blocks(SimpleNamespace(layers=student.layers[: args.checkpoint_blocks]), 1)
        else:
            checkpoint_blocks(student, args.checkpoint_every, args.checkpoint_scope)
    opt = optim.AdamW(learning_rate=1e-4)
    opt.init(student.trainable_parameters())
    from conch_dna.training.kd.trainer import make_update

    update = make_update(student, opt, 1.0, compiled)  # the trainer's: mean gradient, clipping, AdamW
    weights_gb = mx.get_active_memory() / 2**30
    tokens = mx.random.randint(0, vocab, (batch, seq))
    mask = mx.ones((batch, seq), dtype=mx.bool_)
    t_body, t_head = model_parts(teacher)
    if args.compile_teacher:
        t_body = mx.compile(t_body)

    def teacher_targets():
        if impl == "fused":
            return TeacherStates(teacher_hidden(t_body, tokens, args.teacher_pass_tokens), t_head)  # hidden states only
        return mx.stop_gradient(teacher(tokens))

    def loss_fn(model, tokens, mask, targets):
        if impl == "fused":
            out = fused_objective(model, targets, tokens, mask, alpha=0.7, temperature=2.0, chunk_size=args.chunk,
                                  compiled=compiled)
        else:
            out = kd_objective(model(tokens), targets, tokens, mask, 0.7, 2.0)
        return out["loss"]

    loss_and_grad = nn.value_and_grad(student, loss_fn)
    if compiled:  # the trainer's compiled step (conch_dna.training.kd.trainer.compile_loss_and_grad)
        from conch_dna.training.kd.trainer import compile_loss_and_grad

        loss_and_grad = compile_loss_and_grad(student, loss_and_grad)

    teacher_stream = mx.new_stream(mx.default_device()) if args.overlap_teacher else None
    pending = []

    def overlapped_targets():
        # Experiment: the next step's teacher pass runs on its own stream while this step's student runs.
        if not pending:
            with mx.stream(teacher_stream):
                h = mx.stop_gradient(t_body(tokens))
            mx.eval(h)
            pending.append(h)
        current = pending.pop()
        with mx.stream(teacher_stream):
            h = mx.stop_gradient(t_body(tokens))
        mx.async_eval(h)
        pending.append(h)
        return TeacherStates(current, t_head)

    def step():
        targets = overlapped_targets() if teacher_stream is not None else teacher_targets()
        mx.eval(targets)
        loss, grads = loss_and_grad(student, tokens, mask, targets)
        norm = update(grads, mx.array(1.0))
        mx.eval(loss, norm, student.trainable_parameters(), opt.state)
        return loss

    for _ in range(args.warmup):
        step()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    dt = (time.perf_counter() - t0) / args.steps
    peak = mx.get_peak_memory() / 2**30
    # Split: teacher alone, and the loss (+ its hidden-state gradient) alone on fixed hidden states.
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        mx.eval(teacher_targets())
    t_teacher = (time.perf_counter() - t0) / args.steps
    teacher_peak = mx.get_peak_memory() / 2**30
    t_loss = None
    if impl == "fused":
        s_body, s_head = model_parts(student)
        h = mx.stop_gradient(s_body(tokens))
        tt = teacher_targets()
        mx.eval(h, tt)

        def only_loss(hh):
            from conch_dna.training.kd.fused import fused_kd_loss

            B, L, D = hh.shape
            return fused_kd_loss(hh[:, :-1].reshape(-1, D), s_head, tt.hidden[:, :-1].reshape(B * (L - 1), -1),
                                 tokens[:, 1:].reshape(-1), mask[:, 1:].reshape(-1), teacher_head=tt.head,
                                 chunk_size=args.chunk)["loss"]

        g = mx.grad(only_loss)
        mx.eval(g(h))
        t0 = time.perf_counter()
        for _ in range(args.steps):
            mx.eval(g(h))
        t_loss = (time.perf_counter() - t0) / args.steps
    flops = batch * seq * (2 * nt + 4 * ns)  # the peer's convention: LoRA needs no weight gradients
    device = mx.device_info().get("device_name", str(mx.default_device()))
    peak_tf = next((v for k, v in PEAK_TFLOPS.items() if k in device), None)
    res = {
        "impl": f"mlx-{impl}", "preset": args.preset, "real": args.real, "device": device, "dtype": str(dtype),
        "B": batch, "T": seq, "chunk": args.chunk if impl == "fused" else None, "grad_checkpoint": args.grad_checkpoint and (args.checkpoint_blocks or f"{args.checkpoint_scope} every {args.checkpoint_every}"),
        "teacher_pass_tokens": args.teacher_pass_tokens, "memory_limit_gb": args.memory_limit_gb,
        "overlap_teacher": args.overlap_teacher,
        "compiled": compiled, "lora": "mlx-lm" if args.stock_lora else "conch",
        "step_s": round(dt, 4), "tok_s": round(batch * seq / dt, 1), "peak_gb": round(peak, 2),
        "weights_gb": round(weights_gb, 2), "teacher_fwd_peak_gb": round(teacher_peak, 2),
        "teacher_fwd_s": round(t_teacher, 4), "loss_s": None if t_loss is None else round(t_loss, 4),
        "student_and_rest_s": round(dt - t_teacher - (t_loss or 0.0), 4),
        "tflops": round(flops / dt / 1e12, 2), "mfu": None if peak_tf is None else round(flops / dt / 1e12 / peak_tf, 3),
        "loss": round(float(loss.item()), 4), "teacher_params": nt, "student_params": ns,
    }
    return res


def run_trainer(args) -> dict:
    """The distiller's training loop end to end (`trainer.train_with_kd` with the distiller's online targets):
    compiled step, teacher prefetch and memory limit as a user's run has them; tokens/s between step events."""
    import tempfile

    from conch_dna.training.kd import KDConfig
    from conch_dna.training.kd.data import Example
    from conch_dna.training.kd.report import Step
    from conch_dna.training.kd.targets import online_targets
    from conch_dna.training.kd.trainer import (
        adapter_config,
        apply_lora,
        train_with_kd,
        use_compile,
        use_prefetch,
    )

    t_shape, s_shape, vocab, batch, seq = PRESETS[args.preset]
    batch, seq = args.batch or batch, args.seq or seq
    gpu = mx.default_device() == mx.gpu
    dtype = mx.bfloat16 if gpu else mx.float32
    mx.random.seed(0)
    teacher, student = build(t_shape, vocab, dtype), build(s_shape, vocab, dtype)
    iters = args.warmup + args.steps
    cfg = KDConfig(lora=PEER_LORA,
                   temperature=2.0, alpha=0.7, loss_chunk_size=args.chunk, batch_size=batch, iters=iters,
                   learning_rate=1e-4, lr_schedule="constant", val_fraction=0.0, val_interval=10**6,
                   checkpoint_interval=10**6, grad_checkpoint=args.grad_checkpoint,
                   grad_checkpoint_every=args.checkpoint_every, grad_checkpoint_scope=args.checkpoint_scope,
                   teacher_pass_tokens=args.teacher_pass_tokens,
                   compile_step=args.compile, teacher_prefetch=args.prefetch, memory_limit_gb=args.memory_limit_gb)
    n_blocks = apply_lora(student, cfg)
    rng = mx.random.randint(1, vocab, (batch * iters, seq)).tolist()
    train = [Example(tuple(row), 1) for row in rng]  # the loss on every position after the first
    targets_fn = online_targets(teacher, cfg, prefetch=use_prefetch(cfg))  # the distiller's online targets
    times = []

    def on_event(event):
        if isinstance(event, Step):
            mx.synchronize()
            times.append(time.perf_counter())
            if len(times) == args.warmup:
                mx.reset_peak_memory()

    with tempfile.TemporaryDirectory() as out:
        train_with_kd(student, train, [], targets_fn, cfg, Path(out), adapter_cfg=adapter_config(cfg, n_blocks),
                      reporter=on_event)
    dt = (times[-1] - times[args.warmup - 1]) / args.steps
    device = mx.device_info().get("device_name", str(mx.default_device()))
    return {"impl": "mlx-trainer", "preset": args.preset, "device": device, "dtype": str(dtype), "B": batch, "T": seq,
            "chunk": args.chunk, "grad_checkpoint": args.grad_checkpoint and f"{args.checkpoint_scope} every {args.checkpoint_every}",
            "compiled": use_compile(cfg), "teacher_prefetch": use_prefetch(cfg), "memory_limit_gb": args.memory_limit_gb,
            "step_s": round(dt, 4), "tok_s": round(batch * seq / dt, 1), "peak_gb": round(mx.get_peak_memory() / 2**30, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--impl", choices=["reference", "fused", "both"], default="both")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (--trainer: at least 2)")
    ap.add_argument("--real", action="store_true", help="real default-pair weights (smollm2 preset)")
    ap.add_argument("--grad-checkpoint", action="store_true")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="mx.compile the student's step as the trainer does (auto: on a GPU)")
    ap.add_argument("--checkpoint-every", type=int, default=1, help="with --grad-checkpoint: every k-th block")
    ap.add_argument("--checkpoint-scope", choices=["block", "mlp"], default="block",
                    help="with --grad-checkpoint: recompute whole blocks or only their MLPs")
    ap.add_argument("--checkpoint-blocks", type=int, help="with --grad-checkpoint: only the first N blocks")
    ap.add_argument("--teacher-pass-tokens", type=int, default=4096, help="teacher forward: rows per pass")
    ap.add_argument("--compile-teacher", action="store_true", help="mx.compile the teacher's forward too")
    ap.add_argument("--overlap-teacher", action="store_true", help="experiment: next teacher pass on a second stream")
    ap.add_argument("--memory-limit-gb", type=float, help="mx.set_memory_limit: MLX throttles to stay under it")
    ap.add_argument("--stock-lora", action="store_true", help="mlx-lm's LoRA layer (float32 LoRA matmuls)")
    ap.add_argument("--out", help="append the JSON lines to this file")
    ap.add_argument("--trainer", action="store_true", help="time the trainer's loop end to end (train_with_kd)")
    ap.add_argument("--prefetch", choices=["auto", "on", "off"], default="auto", help="with --trainer: teacher_prefetch")
    args = ap.parse_args()

    def report(r: dict) -> None:
        print(json.dumps(r), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")

    if args.trainer:  # train_with_kd applies the memory limit itself
        if args.warmup < 2:
            ap.error("--trainer needs --warmup >= 2 (the first step compiles)")
        report(run_trainer(args))
        return
    from conch_dna.training.kd.trainer import memory_limit

    impls = ["reference", "fused"] if args.impl == "both" else [args.impl]
    rows = []
    for impl in impls:
        try:
            with memory_limit(args.memory_limit_gb):  # as the trainer sets it: for the run, then put back
                r = run(args, impl)
        except Exception as e:  # out of memory etc.: report it as a row, keep going
            r = {"impl": f"mlx-{impl}", "preset": args.preset, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        rows.append(r)
        report(r)
    print("\n| impl | B x T | tokens/s | peak GB | step s | teacher s | loss s | TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['impl']} | | {r['error']} | | | | | |")
        else:
            print(f"| {r['impl']} | {r['B']} x {r['T']} | {r['tok_s']:.0f} | {r['peak_gb']} | {r['step_s']} | "
                  f"{r['teacher_fwd_s']} | {r['loss_s']} | {r['tflops']} |")


if __name__ == "__main__":
    main()
