#!/usr/bin/env python
"""Time the KD training step: teacher forward + student forward/backward + optimizer.

    python benchmarks/bench_kd.py --preset tiny                      # CPU, reference and fused side by side
    python benchmarks/bench_kd.py --preset qwen2.5-1.5b->0.5b --batch 8 --impl fused    # on a GPU
    python benchmarks/bench_kd.py --preset smollm2 --real            # the real default pair (+ cache, generation)
    python benchmarks/bench_kd.py --preset qwen2.5-1.5b->0.5b --frontier --peer-liger --out F.jsonl --plot F.png
    python benchmarks/bench_kd.py --preset qwen2.5-3b->0.5b --frontier --peer-liger --peer-arg teacher=3b
                                                                  # best tokens/s per memory budget, ours and peers

Prints one JSON line per run (tokens/s, peak memory, step-time split, model FLOP utilisation) and a table.
Random weights of the preset's shapes unless --real. Shapes of `qwen2.5-1.5b->0.5b` match the PyTorch peers
beside this script, peer_torch_kd.py and peer_liger_kd.py (LoRA r=16 on q,k,v,o; forward KL T=2 + CE, alpha
0.7; vocab 151936).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

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
    # the larger pair (peer: benchmarks/peer_liger_kd.py with teacher=3b)
    "qwen2.5-3b->0.5b": (dict(layers=36, hidden=2048, inter=11008, heads=16, kv=2, qwen=True),
                         dict(layers=24, hidden=896, inter=4864, heads=14, kv=2, qwen=True), 151936, 8, 1024),
}
PEER_LORA = {  # as in peer_torch_kd.py: r=16 on q, k, v, o
    "rank": 16, "scale": 2.0, "keys": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 tensor-core peak (SXM)


def build(shape: dict, vocab: int, dtype, materialize: bool = True):
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
    if materialize:  # unevaluated, a model's shapes and byte counts are known without allocating its weights
        mx.eval(model.parameters())
    return model


def preset_weights_bytes(preset: str) -> int:
    """bf16 bytes of a preset's teacher and student, from their shapes alone (building even an unevaluated model
    uses MLX's GPU stream, which fixes its queue's bound): tied embeddings, Qwen2's q/k/v biases."""
    t_shape, s_shape, vocab, _, _ = PRESETS[preset]

    def params(sh):
        h, kv_width = sh["hidden"], sh["kv"] * sh["hidden"] // sh["heads"]
        attention = 2 * h * h + 2 * h * kv_width + (h + 2 * kv_width if sh.get("qwen") else 0)
        return vocab * h + h + sh["layers"] * (attention + 3 * h * sh["inter"] + 2 * h)

    return 2 * (params(t_shape) + params(s_shape))


def kernel_table(name, f, steps=5):
    """CUDA only, PyTorch installed: the GPU kernels of `steps` calls of f, grouped by name, as JSON lines: ms and launches per call."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.init()
    mx.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            mx.eval(f())
        mx.synchronize()
        wall = (time.perf_counter() - t0) / steps
    rows = sorted(((e.self_device_time_total, e.count, e.key) for e in prof.key_averages()
                   if e.self_device_time_total > 0), reverse=True)
    total = sum(r[0] for r in rows) / steps / 1000
    print(json.dumps({"name": f"kernels: {name}", "wall_ms": round(wall * 1000, 2), "kernel_ms": round(total, 2),
                      "launches": sum(r[1] for r in rows) // steps}), flush=True)
    for us, count, key in rows[:40]:
        print(json.dumps({"kernel": key[:110], "ms": round(us / steps / 1000, 3), "per_step": count // steps}),
              flush=True)


def busy_spans(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of the intervals as disjoint spans, in order: kernels that overlap (two streams) count once."""
    merged: list[list[float]] = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def busy_share(intervals: list[tuple[float, float]]) -> float:
    """Of the span from the first interval's start to the last one's end, the share covered by at least one
    interval: a GPU's busy time."""
    spans = busy_spans(intervals)
    if not spans:
        return 0.0
    return sum(e - s for s, e in spans) / (spans[-1][1] - spans[0][0])


KERNEL_KINDS = (("matmul", ("nvjet", "gemm", "cublas", "splitkreduce")), ("attention", ("sdpa", "fmha", "cudnn")),
                ("ours", ("custom_kernel",)), ("norm", ("rms_norm", "layer_norm")), ("reduce", ("reduce",)),
                ("copy", ("copy", "memset", "memcpy", "concatenate", "gather", "scatter")))


def kernel_kind(name: str) -> str:
    """A kernel's kind by its name: matmul, attention, ours (mx.fast custom kernels), norm, reduce, copy, or
    elementwise (MLX's compiled and unary/binary kernels, the rest)."""
    low = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(m in low for m in marks)), "elementwise")


def kernel_breakdown(events: list[tuple[str, float, float]], steps: int, top: int = 25) -> dict:
    """Kernel time and launches per step by kind (`kernel_kind`) and for the `top` kernels by time, from
    (name, start, end) events in microseconds: where a profiled step's GPU time goes."""
    by_name: dict[str, list[float]] = {}
    for name, s, e in events:
        acc = by_name.setdefault(name, [0.0, 0])
        acc[0], acc[1] = acc[0] + e - s, acc[1] + 1
    kinds: dict[str, list[float]] = {}
    for name, (us, n) in by_name.items():
        acc = kinds.setdefault(kernel_kind(name), [0.0, 0])
        acc[0], acc[1] = acc[0] + us, acc[1] + n
    per_step = lambda us, n: [round(us / steps / 1000, 2), n // steps]  # noqa: E731
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {"kinds_ms_launches": {k: per_step(*v) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1][0])},
            "top_kernels_ms_launches": [[name[:90], *per_step(*v)] for name, v in ranked]}


def idle_gaps(intervals: list[tuple[float, float]]) -> list[float]:
    """The gaps between the busy spans, longest first: a few long ones point at the host (step boundaries,
    waits), many short ones at launch overheads."""
    spans = busy_spans(intervals)
    return sorted((b[0] - a[1] for a, b in zip(spans, spans[1:])), reverse=True)


class KernelTimeline:
    """CUDA only, PyTorch installed: the GPU kernels run between `start()` and `stop()` (torch.profiler), as
    `summary()`: kernel time per step and the share of the span in which the GPU ran any kernel (what the rest
    is: waits at step boundaries, under a memory limit, or on Python queueing work)."""

    def __init__(self):
        import torch
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.init()
        self.prof = profile(activities=[ProfilerActivity.CUDA])

    # No synchronising at either end: through the trainer the next step's work is already queued, and
    # draining it would leave the window's first step unprofiled and the timed interval uneven.
    def start(self):
        self.prof.start()

    def stop(self):
        self.prof.stop()

    def summary(self, steps: int) -> dict:
        from torch.autograd import DeviceType

        named = [(e.name, e.time_range.start, e.time_range.end) for e in self.prof.events()
                 if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start]
        kernels = [(s, e) for _, s, e in named]
        total = sum(e - s for s, e in kernels)
        gaps = idle_gaps(kernels)  # microseconds
        return {"kernel_ms_per_step": round(total / steps / 1000, 2), "gpu_busy_share": round(busy_share(kernels), 4),
                "launches_per_step": len(kernels) // steps,
                "idle_ms_per_step": round(sum(gaps) / steps / 1000, 2),
                "idle_ms_in_gaps_over_1ms_per_step": round(sum(g for g in gaps if g > 1000) / steps / 1000, 2),
                "longest_gaps_ms": [round(g / 1000, 2) for g in gaps[:8]], **kernel_breakdown(named, steps)}


def n_params(model) -> int:
    from mlx.utils import tree_flatten

    return sum(p.size for _, p in tree_flatten(model.parameters()))


def run(args, impl: str) -> dict:
    from conch_dna.training.kd import KDConfig
    from conch_dna.training.kd.fused import (
        Chunking,
        TeacherStates,
        fused_objective,
        model_parts,
        teacher_hidden,
    )
    from conch_dna.training.kd.losses import LossSpec, kd_objective
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
    from conch_dna.training.kd.lean import lean_backward, use_lean_backward

    lean = use_lean_backward(KDConfig(lean_backward=args.lean_backward))
    if lean:
        lean_backward(student)
    from conch_dna.training.kd import kernels

    if args.layer_kernels:  # as the trainer does (`build_step`); the teacher's pass below as `targets.online_targets`
        kernels.use_rope_kernel(student)
    teacher_kernels = kernels.teacher_kernels if args.layer_kernels else lambda model: nullcontext()
    if args.grad_checkpoint:
        from conch_dna.training.kd.lean import checkpoint_blocks

        if args.checkpoint_blocks is not None:  # only the first N blocks
            from types import SimpleNamespace

            checkpoint_blocks(SimpleNamespace(layers=student.layers[: args.checkpoint_blocks]), 1)
        else:
            checkpoint_blocks(student, args.checkpoint_every, args.checkpoint_scope, args.whole_blocks)
    opt = optim.AdamW(learning_rate=1e-4)
    opt.init(student.trainable_parameters())
    from conch_dna.training.kd.flat import FlatLayout
    from conch_dna.training.kd.update import make_update

    update = make_update(student, opt, 1.0, compiled)  # the trainer's: mean gradient, clipping, AdamW
    layout = FlatLayout.of(student.trainable_parameters())  # the update takes the gradient as one vector
    weights_gb = mx.get_active_memory() / 2**30
    tokens = mx.random.randint(0, vocab, (batch, seq))
    mask = mx.ones((batch, seq), dtype=mx.bool_)
    t_body, t_head = model_parts(teacher)
    if args.compile_teacher:
        t_body = mx.compile(t_body)

    def teacher_targets():
        with teacher_kernels(teacher):
            if impl == "fused":  # hidden states only
                return TeacherStates(teacher_hidden(t_body, tokens, args.teacher_pass_tokens), t_head)
            return mx.stop_gradient(teacher(tokens))

    def loss_fn(model, tokens, mask, targets):
        if impl == "fused":
            out = fused_objective(model, targets, tokens, mask, LossSpec(0.7, 2.0), Chunking(args.chunk, compiled=compiled))
        else:
            out = kd_objective(model(tokens), targets, tokens, mask, LossSpec(0.7, 2.0))
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
            with mx.stream(teacher_stream), teacher_kernels(teacher):
                h = mx.stop_gradient(t_body(tokens))
            mx.eval(h)
            pending.append(h)
        current = pending.pop()
        with mx.stream(teacher_stream), teacher_kernels(teacher):
            h = mx.stop_gradient(t_body(tokens))
        mx.async_eval(h)
        pending.append(h)
        return TeacherStates(current, t_head)

    def step():
        targets = overlapped_targets() if teacher_stream is not None else teacher_targets()
        mx.eval(targets)
        loss, grads = loss_and_grad(student, tokens, mask, targets)
        norm = update(layout.flatten(grads), loss, mx.array(1.0))
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
    if args.kernels:
        kernel_table(f"step {impl} B{batch}", step, args.steps)
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
            from conch_dna.training.kd.fused import Chunking, Rows, fused_kd_loss

            B, L, D = hh.shape
            return fused_kd_loss(hh[:, :-1].reshape(-1, D), s_head, TeacherStates(tt.hidden[:, :-1].reshape(B * (L - 1), -1), tt.head),
                                 Rows(tokens[:, 1:].reshape(-1), mask[:, 1:].reshape(-1)), chunking=Chunking(args.chunk))["loss"]

        g = mx.grad(only_loss)
        mx.eval(g(h))
        t0 = time.perf_counter()
        for _ in range(args.steps):
            mx.eval(g(h))
        t_loss = (time.perf_counter() - t0) / args.steps
    flops = batch * seq * (2 * nt + 4 * ns)  # the peer's convention: LoRA needs no weight gradients
    device = mx.device_info().get("device_name", str(mx.default_device()))
    peak_tf = next((v for k, v in PEAK_TFLOPS.items() if k in device), None)
    from conch_dna.training.kd.lean import checkpoint_setting

    ckpt_words = checkpoint_setting(KDConfig(grad_checkpoint=True, grad_checkpoint_every=args.checkpoint_every,
                                             grad_checkpoint_scope=args.checkpoint_scope, grad_checkpoint_whole_blocks=args.whole_blocks))
    res = {
        "impl": f"mlx-{impl}", "preset": args.preset, "real": args.real, "device": device, "dtype": str(dtype),
        "B": batch, "T": seq, "chunk": args.chunk if impl == "fused" else None, "grad_checkpoint": args.grad_checkpoint and (args.checkpoint_blocks or ckpt_words),
        "teacher_pass_tokens": args.teacher_pass_tokens, "memory_limit_gb": args.memory_limit_gb,
        "overlap_teacher": args.overlap_teacher,
        "compiled": compiled, "lora": "mlx-lm" if args.stock_lora else "conch", "lean_backward": lean,
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
    from conch_dna.training.kd.checkpoints import adapter_config
    from conch_dna.training.kd.examples import Example
    from conch_dna.training.kd.lean import checkpoint_setting, use_lean_backward
    from conch_dna.training.kd.report import Step
    from conch_dna.training.kd.targets import online_targets
    from conch_dna.training.kd.trainer import (
        Hooks,
        TrainingData,
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
    # One untimed step after the timed ones: the last timed step's interval then holds the next step's teacher
    # pass (prefetched), as every other's does; ending the run there would leave it out (fewer FLOPs timed).
    iters = args.warmup + args.steps + 1
    accumulation = args.grad_accumulation
    cfg = KDConfig(lora=PEER_LORA, grad_accumulation=accumulation,  # ids, not the offline defaults: random weights
                   teacher_model_id=f"random-{args.preset}-teacher", student_model_id=f"random-{args.preset}-student",
                   temperature=2.0, alpha=0.7, loss_chunk_size=args.chunk, batch_size=batch, iters=iters,
                   own_answers="off", unlikelihood=0.0, no_repeat_teacher=False,  # the peers' objective: no loop terms
                   learning_rate=1e-4, lr_schedule="constant", val_fraction=0.0, val_interval=10**6,
                   checkpoint_interval=10**6, grad_checkpoint=args.grad_checkpoint,
                   grad_checkpoint_every=args.checkpoint_every, grad_checkpoint_scope=args.checkpoint_scope,
                   grad_checkpoint_whole_blocks=args.whole_blocks,
                   teacher_pass_tokens=args.teacher_pass_tokens, lean_backward=args.lean_backward,
                   compile_step=args.compile, teacher_prefetch=args.prefetch, memory_limit_gb=args.memory_limit_gb)
    n_blocks = apply_lora(student, cfg)
    if args.memory_budget_gb is not None:  # as the distiller does with memory_budget_gb
        from conch_dna.training.kd.memory import settings_for_budget

        cfg = cfg.model_copy(update=settings_for_budget(student, teacher, cfg, seq, args.memory_budget_gb))
        batch, accumulation = cfg.batch_size, cfg.grad_accumulation
    rng = mx.random.randint(1, vocab, (batch * accumulation * iters, seq)).tolist()
    train = [Example(tuple(row), 1) for row in rng]  # the loss on every position after the first
    teacher_targets = online_targets(teacher, cfg, prefetch=use_prefetch(cfg))  # the distiller's online targets
    times = []
    timeline = KernelTimeline() if args.kernels else None
    # The timed steps' peak memory while the teacher's pass is queued and while anything else is: MLX allocates
    # an operation's output as it queues it and frees it when the GPU is done with it, so a peak read on each
    # side of the (synchronous) queueing of the teacher's pass is that phase's.
    phase_peaks = {"teacher": 0.0, "rest": 0.0}

    def read_peak(phase: str) -> None:
        if args.phase_peaks:
            if len(times) >= args.warmup:
                phase_peaks[phase] = max(phase_peaks[phase], mx.get_peak_memory())
            mx.reset_peak_memory()

    def targets_fn(idx, split, tokens):
        read_peak("rest")
        targets = teacher_targets(idx, split, tokens)
        read_peak("teacher")
        return targets

    def on_event(event):
        if isinstance(event, Step):  # step k's figures are read: its work is done, the next one's is queued
            times.append(time.perf_counter())
            if len(times) == args.warmup:
                mx.reset_peak_memory()
                if timeline:
                    timeline.start()
            if timeline and len(times) == args.warmup + args.steps:
                timeline.stop()

    with tempfile.TemporaryDirectory() as out:
        train_with_kd(student, TrainingData(train, [], targets_fn), cfg, Path(out), adapter_cfg=adapter_config(cfg, n_blocks),
                      hooks=Hooks(reporter=on_event))
    read_peak("rest")
    dt = (times[args.warmup + args.steps - 1] - times[args.warmup - 1]) / args.steps
    if timeline:  # the timed steps ran under the profiler: compare their tokens/s only with other profiled runs
        extra = {"profiled": True, **timeline.summary(args.steps)}
    device = mx.device_info().get("device_name", str(mx.default_device()))
    return {"impl": "mlx-trainer", "preset": args.preset, "device": device, "dtype": str(dtype),
            "B": batch * accumulation, "micro_batch": batch, "T": seq, "chunk": cfg.loss_chunk_size,
            "grad_checkpoint": checkpoint_setting(cfg) or False,
            "compiled": use_compile(cfg), "teacher_prefetch": use_prefetch(cfg), "memory_limit_gb": cfg.memory_limit_gb,
            "lean_backward": use_lean_backward(cfg),
            "memory_budget_gb": args.memory_budget_gb,
            "step_s": round(dt, 4), "tok_s": round(batch * accumulation * seq / dt, 1),
            "peak_gb": round(max(mx.get_peak_memory(), *phase_peaks.values()) / 2**30, 2),
            "queue_mb": os.environ.get("MLX_MAX_MB_PER_BUFFER"),
            **({f"peak_{k}_gb": round(v / 2**30, 2) for k, v in phase_peaks.items()} if args.phase_peaks else {}),
            **(extra if timeline else {})}


def frontier_settings(args) -> list[dict]:
    """Our settings to run: for each batch of --frontier-batches and each budget, what `settings_for_budget`
    chooses (the same rules as the distiller's memory_budget_gb, the queue's bound included: `queue_mb`, for the
    run's --queue-mb), each distinct one once."""
    from conch_dna.training.kd import KDConfig
    from conch_dna.training.kd.memory import (
        QUEUE_MB,
        MemoryPreflightError,
        queue_bound_pays,
        settings_for_budget,
    )
    from conch_dna.training.kd.trainer import apply_lora

    t_shape, s_shape, vocab, _, seq = PRESETS[args.preset]
    dtype = mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32
    teacher, student = build(t_shape, vocab, dtype, materialize=False), build(s_shape, vocab, dtype, materialize=False)
    apply_lora(student, KDConfig(lora=PEER_LORA))
    chosen = []
    for batch in args.frontier_batches:
        for budget in args.budgets:
            cfg = KDConfig(lora=PEER_LORA, batch_size=batch, temperature=2.0, alpha=0.7)
            bounded = queue_bound_pays(budget, preset_weights_bytes(args.preset))
            try:
                s = {"batch": batch, **settings_for_budget(student, teacher, cfg, args.seq or seq, budget, bounded),
                     "queue_mb": QUEUE_MB if bounded else 0}
            except MemoryPreflightError:
                continue
            if s not in chosen:
                chosen.append(s)
    return chosen


def child(cmd: list[str], label: str, timeout: float) -> dict:
    """Run one benchmark process; its last JSON line, or an error row (an out-of-memory ends only that run)."""
    import subprocess

    print(f"== {label}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rows = [line for line in p.stdout.splitlines() if line.startswith("{")]
        row = json.loads(rows[-1]) if rows else {"error": (p.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    except subprocess.TimeoutExpired:
        row = {"error": f"timed out after {timeout:.0f} s"}
    return {"label": label, **row}


def run_frontier(args, report) -> list[dict]:
    """Ours and the peers, side by side, --repeats times (interleaved, so a slow patch of the machine hits all)."""
    me = [sys.executable, str(Path(__file__).resolve()), "--preset", args.preset, "--trainer", "--warmup", "2",
          "--steps", str(args.steps)] + (["--seq", str(args.seq)] if args.seq else [])
    runs = []
    ours = frontier_settings(args)
    # One unrecorded run first: the first run on a freshly started H200 once ran past its 100 s limit
    # while the nine after it took ~28 s each (first use of the machine's CUDA kernels and caches, we think).
    child(me + ["--batch", str(args.frontier_batches[0]), "--steps", "1"], "warm-up (not recorded)", args.run_timeout)
    for r in range(args.repeats):
        for s in ours:
            cmd = me + ["--batch", str(s["batch_size"]), "--grad-accumulation", str(s["grad_accumulation"]),
                        "--chunk", str(s["loss_chunk_size"])]
            if s["grad_checkpoint"]:
                cmd += ["--grad-checkpoint", "--checkpoint-scope", s["grad_checkpoint_scope"],
                        "--whole-blocks", str(s["grad_checkpoint_whole_blocks"])]
            if s["memory_limit_gb"] is not None:
                cmd += ["--memory-limit-gb", str(s["memory_limit_gb"])]
            cmd += ["--queue-mb", str(s["queue_mb"])]
            label = (f"conch_dna B{s['batch']}" + (f" (micro {s['batch_size']})" if s["grad_accumulation"] > 1 else "")
                     + (f" ckpt {s['grad_checkpoint_scope']}" if s["grad_checkpoint"] else "")
                     + (f" ({s['grad_checkpoint_whole_blocks']} whole)" if s["grad_checkpoint"] and s["grad_checkpoint_whole_blocks"] else "")
                     + f" chunk {s['loss_chunk_size']}"
                     + (f" limit {s['memory_limit_gb']}" if s["memory_limit_gb"] is not None else "")
                     + (f" queue {s['queue_mb']} MB" if s["queue_mb"] else ""))
            runs.append(report({"who": "conch_dna", "repeat": r, **child(cmd, label, args.run_timeout)}))
        for peer, path, variants in (("liger", args.peer_liger, [(b, c) for b in args.peer_batches for c in (False, True)]),
                                     ("torch", args.peer_torch, [(b, False) for b in args.peer_torch_batches])):
            if not path:
                continue
            for batch, ckpt in variants:
                cmd = [sys.executable, path, str(batch)] + (["ckpt"] if ckpt else []) + args.peer_arg
                label = f"{peer} B{batch}" + (" ckpt" if ckpt else "")
                runs.append(report({"who": peer, "repeat": r, **child(cmd, label, args.run_timeout)}))
    return runs


def summarise_frontier(runs: list[dict], budgets: list[float], plot: str | None = None) -> str:
    """Per budget and implementation: the best median tokens/s of a setting whose every run stayed within it."""
    import statistics

    by_setting: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        if "tok_s" in r:
            by_setting.setdefault((r["who"], r["label"]), []).append(r)
    whos = sorted({who for who, _ in by_setting}, key=lambda w: (w != "conch_dna", w))
    table = {}
    for budget in budgets:
        for who in whos:
            fits = [(statistics.median(x["tok_s"] for x in rs), label, rs) for (w, label), rs in by_setting.items()
                    if w == who and max(x["peak_gb"] for x in rs) <= budget]
            table[(budget, who)] = max(fits, key=lambda f: f[0]) if fits else None
    lines = ["| budget | " + " | ".join(f"{w}: best tokens/s (runs), setting, peak GB" for w in whos)
             + " | conch_dna / best peer |", "|---" * (len(whos) + 2) + "|"]
    for budget in budgets:
        cells = []
        for who in whos:
            best = table[(budget, who)]
            cells.append("none fits" if best is None else
                         f"**{best[0] / 1e3:.1f}k** ({', '.join('%.1fk' % (x['tok_s'] / 1e3) for x in best[2])}), {best[1]}, "
                         f"{max(x['peak_gb'] for x in best[2]):.1f}")
        ours = table.get((budget, "conch_dna"))
        peers = [table[(budget, w)][0] for w in whos if w != "conch_dna" and table[(budget, w)]]
        ratio = f"{ours[0] / max(peers):.2f}x" if ours and peers else "-"
        lines.append(f"| {budget:g} GB | " + " | ".join(cells) + f" | {ratio} |")
    if plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("(no matplotlib: the plot was not drawn)", file=sys.stderr)
        else:
            fig, ax = plt.subplots(figsize=(7, 4))
            for i, who in enumerate(whos):
                color = f"C{i}"
                pts = sorted((x["peak_gb"], x["tok_s"] / 1e3) for (w, _), rs in by_setting.items() if w == who for x in rs)
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, alpha=0.4, color=color, label=f"{who}: each run")
                best = [(b, table[(b, who)][0] / 1e3) for b in budgets if table[(b, who)]]
                ax.plot([b for b, _ in best], [y for _, y in best], "o-", color=color, label=f"{who}: best within the budget")
            ax.set_xlabel("peak GPU memory of a run / memory budget (GB)")
            ax.set_ylabel("tokens/s (thousands)")
            ax.legend()
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(plot, dpi=120)
    return "\n".join(lines)


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
    ap.add_argument("--whole-blocks", type=int, default=0,
                    help="with --checkpoint-scope mlp: the first N recomputed blocks whole (grad_checkpoint_whole_blocks)")
    ap.add_argument("--teacher-pass-tokens", type=int, default=4096, help="teacher forward: rows per pass")
    ap.add_argument("--layer-kernels", "--rope-kernel", dest="layer_kernels", type=int, choices=(0, 1), default=1,
                    help="step mode: RoPE and the teacher's SwiGLU by conch_dna's kernels on NVIDIA GPUs (1, as the "
                         "trainer) or MLX's (0)")
    ap.add_argument("--compile-teacher", action="store_true", help="mx.compile the teacher's forward too")
    ap.add_argument("--overlap-teacher", action="store_true", help="experiment: next teacher pass on a second stream")
    ap.add_argument("--memory-limit-gb", type=float, help="mx.set_memory_limit: MLX throttles to stay under it")
    ap.add_argument("--queue-mb", type=int, help="MLX_MAX_MB_PER_BUFFER for this run; 0: MLX's default (the "
                    "environment's); unset: the distiller's rule (`memory.bound_gpu_queue`)")
    ap.add_argument("--lean-backward", choices=["auto", "on", "off"], default="auto",
                    help="lean.lean_backward: frozen norms without weight gradients, SwiGLU recomputed (auto: on a GPU)")
    ap.add_argument("--kernels", action="store_true", help="the GPU kernels (torch.profiler): step mode, a table; "
                    "--trainer, kernel time per step by kind and for the top kernels, and the GPU's busy share of the timed steps")
    ap.add_argument("--stock-lora", action="store_true", help="mlx-lm's LoRA layer (float32 LoRA matmuls)")
    ap.add_argument("--out", help="append the JSON lines to this file")
    ap.add_argument("--trainer", action="store_true", help="time the trainer's loop end to end (train_with_kd)")
    ap.add_argument("--phase-peaks", action="store_true",
                    help="with --trainer: the timed steps' peak memory while the teacher's pass is queued and otherwise")
    ap.add_argument("--prefetch", choices=["auto", "on", "off"], default="auto", help="with --trainer: teacher_prefetch")
    ap.add_argument("--grad-accumulation", type=int, default=1, help="with --trainer: micro-batches per step")
    ap.add_argument("--memory-budget-gb", type=float,
                    help="with --trainer: the settings memory_budget_gb would choose (they replace the flags)")
    ap.add_argument("--frontier", action="store_true",
                    help="best tokens/s within each of --budgets, ours (--frontier-batches) and the peers', in fresh processes")
    ap.add_argument("--budgets", type=float, nargs="+", default=[8, 16, 25, 40])
    ap.add_argument("--frontier-batches", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--peer-liger", nargs="?", const=str(HERE / "peer_liger_kd.py"),
                    help="run the Liger peer too (PyTorch + PEFT + Liger's kernels and chunked loss; default: "
                    "peer_liger_kd.py beside this script)")
    ap.add_argument("--peer-arg", action="append", default=[],
                    help="an argument added to every peer run (repeatable): teacher=3b for the 3B preset")
    ap.add_argument("--peer-batches", type=int, nargs="+", default=[8, 16, 32], help="Liger peer: batches (each with and without checkpointing)")
    ap.add_argument("--peer-torch", nargs="?", const=str(HERE / "peer_torch_kd.py"),
                    help="run the plain PyTorch + PEFT peer too (default: peer_torch_kd.py beside this script)")
    ap.add_argument("--peer-torch-batches", type=int, nargs="+", default=[8])
    ap.add_argument("--repeats", type=int, default=1, help="--frontier: runs of each setting")
    ap.add_argument("--run-timeout", type=float, default=240, help="--frontier: seconds per run")
    ap.add_argument("--dry-run", action="store_true", help="--frontier: print our settings per budget and stop")
    ap.add_argument("--summarise", metavar="JSONL", nargs="+",
                    help="--frontier's table (and --plot) from its --out files (runs split over several calls: "
                         "their lines pooled, so a setting's runs give its median and spread)")
    ap.add_argument("--plot", help="--frontier / --summarise: draw the frontier into this PNG")
    args = ap.parse_args()
    # Before a model is built (MLX reads it when it first uses the GPU, and even an unevaluated model does).
    if args.queue_mb is None:  # as the distiller's entry point decides
        from conch_dna.training.kd.memory import bound_gpu_queue

        bound_gpu_queue(args.memory_budget_gb or args.memory_limit_gb, preset_weights_bytes(args.preset))
    elif args.queue_mb > 0:
        os.environ["MLX_MAX_MB_PER_BUFFER"] = str(args.queue_mb)

    def report(r: dict) -> None:
        print(json.dumps(r), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")

    if args.summarise:
        runs = [json.loads(line) for path in args.summarise for line in Path(path).read_text().splitlines() if line.strip()]
        print(summarise_frontier(runs, args.budgets, args.plot))
        return
    if args.frontier:
        if args.dry_run:
            for s in frontier_settings(args):
                print(json.dumps(s))
            return
        runs = run_frontier(args, lambda r: (report(r), r)[1])
        print(summarise_frontier(runs, args.budgets, args.plot))
        return
    if args.kernels and not mx.cuda.is_available():
        ap.error("--kernels profiles CUDA kernels: it needs an NVIDIA GPU (MLX's CUDA backend) and PyTorch")
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
