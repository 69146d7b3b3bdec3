"""Memory preflight: estimate a KD step's peak memory from shapes and refuse settings that cannot fit.

On Apple silicon an out-of-memory abort cannot be caught (and can wedge the GPU), so the distiller checks
before the first step and says which settings would fit. The estimate is deliberately simple and errs high:

    weights (student + the teacher when it runs during training)
  + LoRA gradients and AdamW moments (3 x trainable parameters, float32)
  + the larger of the two phases of a step:
      the teacher's forward pass (transient), over two groups of rows: see `teacher_forward_bytes`
      the student's: activations kept for the backward pass, per token and block ~ (22 d + 6 i) values
        (recomputed blocks, with gradient checkpointing: their input, plus one block's worth at a time;
        with grad_checkpoint_scope "mlp", only the MLP's 6 i is recomputed, except in the first
        grad_checkpoint_whole_blocks; the peak is where the backward pass meets it: `backward_peak`)
      + attention scores where no fused attention exists (CPU): batch x heads x seq^2 x 4 bytes per block
      + the loss: fused, ~6 float32 [chunk, vocab] buffers; reference, ~6 [batch x seq, vocab] buffers

With `memory_limit_gb`, MLX keeps the transients (the teacher's pass above all) under the limit by waiting for
work in flight, so the estimate is the limit, but never less than what the step must hold (weights, optimizer
and what the student's step keeps: `held_student_bytes`, from measurements, without the allowance for queued
work, with its own smaller margin, `HELD_MARGIN`). Teacher prefetch (the next pass beside the student's step)
did not raise the measured peak (H100, batch 8: 24.91 vs 24.89 GB; 15.29 vs 15.01 GB under a 15 GB limit), so
it adds nothing here.

`settings_for_budget` turns the estimate around: for a memory budget (`memory_budget_gb`, `--memory-budget-gb`)
it picks the fastest checkpointing, loss chunk, memory limit and micro-batch whose estimate fits.

Calibrated against the H100 runs of docs/benchmarks.md (Qwen2.5 1.5B -> 0.5B, compiled step): with the
1.25 margin, which covers allocator caching, 35.9 / 17.6 / 58.2 GB estimated vs 24.9 / 15.3 / 38.4 GB
measured (batch 8 chunk 2048; batch 8 chunk 1024 checkpointed; batch 16 chunk 2048). Under a limit: 15.0 /
12.0 / 9.0 GB estimated vs 15.07 / 11.86 / 9.25 GB measured (MLPs checkpointed, chunk 2048, limit 15; blocks
checkpointed, chunk 1024, limits 12 and 9): the preflight's 10% headroom covers MLX's small overshoot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from conch_dna.training.kd import kernels
from conch_dna.training.kd.kernels import on_cuda
from conch_dna.training.kd.lean import block_kinds_for, use_lean_backward

MARGIN = 1.25
# The floor under a memory limit (`held_student_bytes`) is not inflated by queued work or cached temporaries:
# measured floors were 0.81-1.07 of the formula before this margin (docs/design.md, "The memory chooser").
HELD_MARGIN = 1.1


class MemoryPreflightError(MemoryError):
    """The estimated peak memory exceeds what the device has; the message lists settings that fit."""


@dataclass
class Shapes:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int


def model_shapes(model) -> Shapes:
    args = model.args
    return Shapes(len(model.layers), args.hidden_size, getattr(args, "intermediate_size", 4 * args.hidden_size),
                  args.num_attention_heads, args.vocab_size)


def param_bytes(model) -> int:
    return sum(p.nbytes for _, p in tree_flatten(model.parameters()))


def trainable_count(model) -> int:
    return sum(p.size for _, p in tree_flatten(model.trainable_parameters()))


def available_bytes() -> int:
    """Memory the default device may use: the GPU's total (Metal/CUDA), else the machine's RAM."""
    info = mx.device_info()
    for key in ("total_memory", "memory_size"):
        if key in info:
            return int(info[key])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def teacher_forward_bytes(teacher, config, batch: int, seq: int, dtype_bytes: int) -> int:
    """Transient memory of the teacher's forward pass over two groups of rows (`teacher_pass_tokens`).
    MLX's CUDA backend held all of a pass's temporaries until it finished: ~(4 d + 2 i) values per token
    and block (Qwen2.5-1.5B, 8192 tokens: 10 GB measured, 11 GB by this formula). One i more where the
    teacher's SwiGLU runs our kernel (`kernels.teacher_kernels`), whose output cannot reuse an input's buffer
    as MLX's compiled `swiglu` does (that pass's peak rose 3.4 GB on an H200; this formula gives 4.1)."""
    t = model_shapes(teacher)
    rows = min(batch, 2 * max(1, config.teacher_pass_tokens // max(1, seq)))  # two groups in flight
    mlp_values = 3 if kernels.available() else 2
    return rows * seq * t.layers * (4 * t.hidden + mlp_values * t.intermediate) * dtype_bytes


# What `lean_backward` saves per token and block in the unconstrained estimate, in values: one [tokens,
# intermediate] activation (`benchmarks/block_memory.py`, CPU float32, Qwen2.5-0.5B widths: a plain block kept
# 152.0 MiB, 133.3 with it). The floor under a limit (`held_student_bytes`) uses the H200's figure instead.
MLP_VALUES_SAVED_BY_LEAN_BACKWARD = 1


def backward_peak(kinds: list[str], kept: dict[str, float], recomputed: dict[str, float]) -> float:
    """The most the blocks hold during the backward pass, which runs from the last block to the first: when it
    reaches block j, blocks 0..j still keep what they kept, and block j's recomputed part is alive too. So
    blocks recomputed early in the model (the first ones) add their recompute to a smaller total."""
    peak = held = 0.0
    for kind in kinds:
        held += kept[kind]
        peak = max(peak, held + recomputed[kind])
    return peak


def keeps_attention_scores() -> bool:
    """Does attention materialise its [seq, seq] scores? On MLX's CPU backend, which has no fused attention."""
    return mx.default_device() == mx.cpu


def estimate_peak_bytes(student, teacher, config, batch: int, seq: int) -> dict[str, int]:
    """Bytes of each part of a training step's peak; `teacher` None when it does not run during training."""
    s = model_shapes(student)
    dtype_bytes = next(p.itemsize for _, p in tree_flatten(student.parameters()))
    tokens = batch * seq
    mlp_values = 6 - MLP_VALUES_SAVED_BY_LEAN_BACKWARD * use_lean_backward(config)
    per_block_token = (22 * s.hidden + mlp_values * s.intermediate) * dtype_bytes
    mlp_token = mlp_values * s.intermediate * dtype_bytes
    # Plain blocks hold their activations; recomputed MLPs keep their input (the rest of their block, its 22 d,
    # stays); blocks recomputed whole keep their input; in the backward pass, one recomputed part at a time.
    kinds = block_kinds_for(config, s.layers)
    d = s.hidden * dtype_bytes
    activations = tokens * backward_peak(kinds, {"plain": per_block_token, "mlp": per_block_token - mlp_token + d, "whole": d},
                                         {"plain": 0, "mlp": mlp_token, "whole": per_block_token})
    attention_blocks = kinds.count("plain") + kinds.count("mlp") + ("whole" in kinds)
    attention = batch * s.heads * seq * seq * 4 * attention_blocks if keeps_attention_scores() else 0
    rows = min(config.loss_chunk_size, tokens) if config.loss_impl == "fused" else tokens
    parts = {
        "weights": param_bytes(student) + (param_bytes(teacher) if teacher is not None else 0),
        "optimizer": 3 * 4 * trainable_count(student),
        "activations": activations,
        "attention": attention,
        "loss": 6 * 4 * rows * s.vocab,
        "teacher_forward": teacher_forward_bytes(teacher, config, batch, seq, dtype_bytes) if teacher is not None else 0,
    }
    student_phase = parts["activations"] + parts["attention"] + parts["loss"]
    fixed = parts["weights"] + parts["optimizer"]
    parts["total"] = int(MARGIN * (fixed + max(parts["teacher_forward"], student_phase)))
    # What the step holds however MLX schedules it (no margin: see BOUNDED_OVERSHOOT_GB)
    parts["floor"] = fixed + held_student_bytes(s, config, tokens, dtype_bytes, rows) + parts["attention"]
    if config.memory_limit_gb is not None:  # MLX waits instead of going past it, down to what must be held
        parts["total"] = min(parts["total"], max(int(config.memory_limit_gb * 2**30), int(HELD_MARGIN * parts["floor"])))
    return parts


def held_student_bytes(s: Shapes, config, tokens: int, dtype_bytes: int, rows: int) -> int:
    """What the student's step holds however MLX schedules it (the floor under `memory_limit_gb`): the
    activations its blocks keep and one loss chunk. Unlike the unconstrained estimate, no allowance for work
    queued ahead. Per token and block, as `benchmarks/block_memory.py` measured (Qwen2.5-0.5B widths, compiled
    step; attention scores apart): ~8 d + 3.5 i values kept by a plain block, 8 d with its MLP recomputed,
    1.5 d recomputed whole; plus, with checkpointing, one recomputed part at a time (`backward_peak`). With `lean_backward` a
    plain MLP keeps 2 i, what SwiGLU's backward reads (gate and up; its frozen projections need no inputs):
    an H200 run of batch 32 without recompute held 27.9 GB, 0.90 of this formula (0.81 with 2.5 i). The loss:
    the CUDA kernel keeps three [rows, vocab] buffers in the model's dtype (student and teacher logits,
    gradient), the other paths ~6 float32 ones (`rows`: the loss chunk, or every token for the reference
    loss)."""
    mlp = (2.0 if use_lean_backward(config) else 3.5) * s.intermediate
    plain = 8 * s.hidden + mlp
    values = backward_peak(block_kinds_for(config, s.layers), {"plain": plain, "mlp": 8 * s.hidden, "whole": 1.5 * s.hidden},
                           {"plain": 0, "mlp": mlp, "whole": plain})
    fused = config.loss_impl == "fused"
    loss_bytes_per_value = 4 * dtype_bytes if fused and kernels.available() else 24  # 3 buffers + room for the matmul
    return int(tokens * values * dtype_bytes + rows * s.vocab * loss_bytes_per_value)


def settings_fastest_first(layers: int) -> list[dict]:
    """Memory settings from fastest to slowest, as measured through the trainer on an H100 and an H200
    (docs/benchmarks.md, Qwen2.5 1.5B -> 0.5B shapes): no recompute; only the MLPs recomputed (what a block
    keeps is mostly its MLP's); then the MLPs with the first 1, 2, ... blocks recomputed whole (each whole
    block recomputes a subset more: a block's attention part, norms and LoRA); every block whole; smaller
    loss chunks last (more, smaller matmuls)."""
    mlp = {"grad_checkpoint": True, "grad_checkpoint_every": 1, "grad_checkpoint_scope": "mlp", "grad_checkpoint_whole_blocks": 0}
    block = {**mlp, "grad_checkpoint_scope": "block"}
    return [
        {"grad_checkpoint": False, "loss_chunk_size": 2048},
        {**mlp, "loss_chunk_size": 2048},
        {**mlp, "loss_chunk_size": 1024},
        *({**mlp, "grad_checkpoint_whole_blocks": w, "loss_chunk_size": 1024} for w in range(1, layers)),
        {**block, "loss_chunk_size": 1024},
        {**block, "loss_chunk_size": 512},
    ]


# memory_limit_gb: 0.75 GB below the budget, as MLX went past its limit by up to 0.59 GB at limits of 7.25 to
# 39.25 GB; 1.5 GB where the weights and optimizer take over TIGHT_SHARE of the budget and the queue is not
# bounded, as the limit then binds through the whole step and MLX went up to 1.14 GB past it
# (docs/design.md, "The memory chooser").
LIMIT_HEADROOM_GB, TIGHT_LIMIT_HEADROOM_GB, TIGHT_SHARE = 0.75, 1.5, 0.4

# MLX's CUDA backend keeps up to 10 CUDA graphs of up to MLX_MAX_MB_PER_BUFFER MB (1000 by default) in flight
# and frees their buffers only once the GPU has run them: a queue of gigabytes, and past a memory limit MLX
# waits after every operation. Graphs of 100 MB hold ~1 GB in flight, so a tight budget runs without that
# waiting (docs/design.md, "The memory chooser"). MLX reads the variable once, when it first uses the GPU.
QUEUE_MB = 100

# With the queue bounded, a step whose floor is above the memory limit no longer idles, and its peak stayed
# within 0.33-0.43 GB of its floor: a setting fits a budget when its floor plus this does, whatever the limit
# (docs/design.md, "The memory chooser").
BOUNDED_OVERSHOOT_GB = 0.5


def queue_bound_pays(budget_gb: float | None, weights_bytes: int | None) -> bool:
    """Where a memory budget or limit of `budget_gb` is tight, the weights over TIGHT_SHARE of it, on CUDA. With
    room to spare the smaller graphs cost more than they save (2.5% at 40 GB: docs/design.md)."""
    tight = budget_gb is not None and weights_bytes is not None and weights_bytes > TIGHT_SHARE * budget_gb * 2**30
    return tight and on_cuda()


def bound_gpu_queue(budget_gb: float | None, weights_bytes: int | None, mb: int = QUEUE_MB) -> bool:
    """Bound what MLX's CUDA backend queues ahead of the GPU (MLX_MAX_MB_PER_BUFFER = `mb`, unless the environment
    sets it) where that pays (`queue_bound_pays`). Entry points call this before any model is loaded: MLX reads the
    variable when it first uses the GPU, later it has no effect. Nothing happens off CUDA: Apple silicon's Metal
    backend closes its command buffers at 40-50 MB already (mlx/backend/metal/device.cpp), and what a bound does
    there is not measured. Returns `queue_bounded()`."""
    if queue_bound_pays(budget_gb, weights_bytes):
        os.environ.setdefault("MLX_MAX_MB_PER_BUFFER", str(mb))
    return queue_bounded()


def queue_advice(budget_gb: float | None, weights_bytes: int | None) -> str | None:
    """What to do where bounding MLX's CUDA queue would pay (`queue_bound_pays`) and it is not bounded, else None.
    A process that used the GPU before the distiller ran (EGO distilling itself) can only bound it when it starts."""
    if not queue_bound_pays(budget_gb, weights_bytes) or queue_bounded():
        return None
    return (f"the weights fill over {TIGHT_SHARE:.0%} of the {budget_gb:g} GB memory budget and MLX's CUDA queue is "
            f"not bounded: set MLX_MAX_MB_PER_BUFFER={QUEUE_MB} in the environment before the process first uses the "
            "GPU (the distiller's CLI does), so that MLX waits less under its memory limit (8 GB on an H200: 64k -> "
            "74k tokens/s)")


def queue_bounded() -> bool:
    """Is MLX's CUDA queue bounded (MLX_MAX_MB_PER_BUFFER at most QUEUE_MB)? Then a memory limit needs only the
    usual headroom (`memory_limit_for`). True of the environment: set after MLX first used the GPU, the bound is
    not in effect although this says so."""
    value = os.environ.get("MLX_MAX_MB_PER_BUFFER", "")
    return on_cuda() and value.isdigit() and int(value) <= QUEUE_MB


def stored_weights_bytes(*model_ids: str | None) -> int | None:
    """Bytes of the models' safetensors files, where every id is an existing folder; None otherwise (a hub id, or
    an offline default not yet prepared: preparing it here could use the GPU before `bound_gpu_queue`)."""
    from conch_dna.models.defaults import weight_bytes

    folders = [Path(str(m)).expanduser() for m in model_ids if m is not None]
    return sum(weight_bytes(f) for f in folders) if folders and all(f.is_dir() for f in folders) else None


def memory_limit_for(budget_gb: float, fixed_gb: float = 0.0, bounded: bool = False) -> float:
    """The memory limit for a budget, `fixed_gb` (weights and optimizer state) of it always held; `bounded`:
    MLX's CUDA queue is bounded (`queue_bounded`)."""
    tight = fixed_gb > TIGHT_SHARE * budget_gb and not bounded
    headroom = TIGHT_LIMIT_HEADROOM_GB if tight else LIMIT_HEADROOM_GB
    return round(budget_gb - headroom, 2)


def settings_for_budget(student, teacher, config, seq: int, budget_gb: float, bounded: bool | None = None) -> dict:
    """The fastest memory settings whose estimated peak fits `budget_gb`, as a `KDConfig` update.

    In order: each of `settings_fastest_first`, first without a memory limit (its whole estimate fits), then
    with `memory_limit_gb` at `memory_limit_for` (what the step must hold fits under it: MLX waits for work in
    flight instead of allocating past it, which cost less than recomputing: 61.6k tokens/s with the MLPs
    recomputed under a 15 GB limit against 62.0k without a limit, H100); then the same with smaller
    micro-batches (divisors of the batch, with `grad_accumulation` raised:
    the optimizer sees the same batch). `bounded`: MLX's CUDA queue will be bounded (default: it is now,
    `queue_bounded`); then a setting under the limit fits when its floor plus `BOUNDED_OVERSHOOT_GB` fits the
    budget, even above the limit. Raises `MemoryPreflightError` when nothing fits."""
    budget = budget_gb * 2**30
    global_batch = config.batch_size * config.grad_accumulation
    fixed = param_bytes(student) + 3 * 4 * trainable_count(student) + (param_bytes(teacher) if teacher is not None else 0)
    fit_gb = memory_limit_for(budget_gb)  # what the step may hold under a limit
    bounded = queue_bounded() if bounded is None else bounded
    limit_gb = memory_limit_for(budget_gb, fixed / 2**30, bounded)  # given to MLX: lower where it overshoots more
    for micro in [m for m in range(config.batch_size, 0, -1) if global_batch % m == 0]:
        base = {"batch_size": micro, "grad_accumulation": global_batch // micro}
        for settings in settings_fastest_first(model_shapes(student).layers):
            for limited in (False, True):
                update = {**base, **settings, "memory_limit_gb": limit_gb if limited else None}
                alt = config.model_copy(update={**update, "memory_limit_gb": fit_gb if limited else None})
                parts = estimate_peak_bytes(student, teacher, alt, micro, seq)
                if parts["total"] <= (fit_gb * 2**30 if limited else budget) or (
                        limited and bounded and parts["floor"] + BOUNDED_OVERSHOOT_GB * 2**30 <= budget):
                    return update
    weights = param_bytes(student) + (param_bytes(teacher) if teacher is not None else 0)
    raise MemoryPreflightError(
        f"no setting fits a memory budget of {budget_gb:g} GB for sequences of {seq} tokens: even one sequence with "
        f"whole blocks recomputed is estimated above it (the weights alone are {weights / 2**30:.1f} GB). Raise the "
        "budget, shorten max_seq_length, or use smaller models.")


def preflight(student, teacher, config, batch: int, seq: int, available: int | None = None) -> dict:
    """Raise `MemoryPreflightError` naming settings that fit when the estimate exceeds 90% of `available`."""
    available = available if available is not None else available_bytes()
    est = estimate_peak_bytes(student, teacher, config, batch, seq)
    if est["total"] <= 0.9 * available:
        return est
    gb = 1 << 30
    suggestions = []
    for b in range(batch - 1, 0, -1):
        if estimate_peak_bytes(student, teacher, config, b, seq)["total"] <= 0.9 * available:
            suggestions.append(f"batch_size={b} (with grad_accumulation={-(-batch // b)} for the same batch)")
            break
    if config.memory_limit_gb is None:  # the teacher's transients may be what does not fit
        limit_gb = round(0.8 * available / 2**30, 1)
        alt = config.model_copy(update={"memory_limit_gb": limit_gb})
        if estimate_peak_bytes(student, teacher, alt, batch, seq)["total"] <= 0.9 * available:
            suggestions.append(f"memory_limit_gb={limit_gb}")
    if not config.grad_checkpoint:  # the least recompute that fits: the MLPs, then the first blocks whole too
        layers = model_shapes(student).layers
        for whole in range(layers + 1):
            scope = "mlp" if whole < layers else "block"
            alt = config.model_copy(update={"grad_checkpoint": True, "grad_checkpoint_every": 1, "grad_checkpoint_scope": scope,
                                            "grad_checkpoint_whole_blocks": whole if scope == "mlp" else 0})
            if estimate_peak_bytes(student, teacher, alt, batch, seq)["total"] <= 0.9 * available:
                suggestions.append("grad_checkpoint=true" + (' with grad_checkpoint_scope="mlp"' if scope == "mlp" else "")
                                   + (f" and grad_checkpoint_whole_blocks={whole}" if 0 < whole < layers else ""))
                break
    if config.loss_impl != "fused":
        alt = config.model_copy(update={"loss_impl": "fused"})
        if estimate_peak_bytes(student, teacher, alt, batch, seq)["total"] <= 0.9 * available:
            suggestions.append('loss_impl="fused"')
    for L in (seq // 2, seq // 4):
        if L >= 8 and estimate_peak_bytes(student, teacher, config, batch, L)["total"] <= 0.9 * available:
            suggestions.append(f"max_seq_length={L}")
            break
    largest = max((k for k in est if k not in ("total", "floor")), key=lambda k: est[k])
    raise MemoryPreflightError(
        f"estimated peak memory {est['total'] / gb:.1f} GB (largest part: {largest} {est[largest] / gb:.1f} GB) exceeds "
        f"90% of the {available / gb:.1f} GB available, for batch {batch} x {seq} tokens. Settings that would fit: "
        + ("; ".join(suggestions) if suggestions else "none found by reducing batch, sequence or checkpointing: use a smaller model")
        + ". (Disable this check with memory_preflight=false at your own risk.)"
    )
