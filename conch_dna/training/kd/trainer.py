"""The KD training loop for LoRA students, in the style of mlx-lm's tuner: plain functions, no Trainer class.

`train_with_kd(model, train, val, targets_fn, config, out_dir)` runs AdamW on the LoRA parameters with the
combined objective from `losses.kd_objective`, validates every `val_interval` steps, checkpoints every
`checkpoint_interval` steps and at the end, and resumes exactly from the latest checkpoint.

Exact resume needs no saved data cursor or RNG state: batch `s` is a function of (seed, s) (see
`data.batch_order`) and the random state (LoRA dropout) is reseeded from (seed, s) at every step. A
checkpoint therefore holds the adapter, the optimizer state and the step; it is written to a temporary
folder and renamed, so a crash leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import structlog
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from conch_dna._faults import fault_point
from conch_dna.atomic import atomic_folder, atomic_write, sha256_file
from conch_dna.training.kd import distributed as dist
from conch_dna.training.kd.config import KDConfig
from conch_dna.training.kd.cross_vocab import CrossTargets, cross_agreement, cross_objective
from conch_dna.training.kd.data import Example, batch_order, pad_batch
from conch_dna.training.kd.fused import TeacherStates, fused_objective, parts_match
from conch_dna.training.kd.losses import SparseTargets, kd_objective, next_token_view

log = structlog.get_logger(__name__)

# targets_fn(indices into the data split, "train" | "val", padded tokens [B, L]) -> dense logits or SparseTargets
TargetsFn = Callable[[list[int], str, mx.array], "mx.array | SparseTargets"]
# on_event(name, **payload): progress for the distiller (which turns them into signals) and tests
EventFn = Callable[..., None]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN/inf; training stopped and the last good checkpoint was kept."""

    def __init__(self, step: int, last_checkpoint: Path | None, value: float):
        self.step, self.last_checkpoint, self.value = step, last_checkpoint, value
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        super().__init__(
            f"loss became {value} at step {step}; training stopped, {where}. "
            "Lower the learning rate, raise max_grad_norm clipping, or check the teacher's outputs."
        )


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint to resume from is unreadable or does not fit this run; the message says what to do."""


class TrainingCancelled(RuntimeError):
    """`should_stop()` returned true; the run stopped at a step boundary."""


# --------------------------------------------------------------------------------------------- LoRA


@cache
def _lora_classes() -> tuple[type, type]:
    """(mlx-lm's LoRALinear, ours). Built on first use: importing mlx_lm costs ~2 s."""
    from mlx_lm.tuner.lora import LoRALinear as MlxLoRALinear

    class LoRALinear(MlxLoRALinear):
        """mlx-lm's LoRA layer (same parameters, same adapter file) that multiplies in the input's dtype.

        mlx-lm keeps lora_a / lora_b in float32 (the optimizer's precision) and computes `x @ lora_a` with a
        bf16 x, so MLX promotes the whole [tokens, D] activation to a float32 copy, keeps it for the backward
        pass and runs both matmuls and their gradients in float32: on an H100 that made a Qwen2.5-0.5B
        student's forward pass 1.6x slower (17.9 -> 29.3 ms). Casting the two small weights instead, as
        PyTorch autocast does, keeps activations in the model's dtype; weights and gradients stay float32.
        """

        def __call__(self, x):
            y = self.linear(x)
            z = (self.dropout(x) @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
            return y + (self.scale * z).astype(x.dtype)

    return MlxLoRALinear, LoRALinear


def apply_lora(model: nn.Module, config: KDConfig) -> int:
    """Freeze the model and add LoRA layers (mlx-lm's, computing in the model's dtype); returns the number
    of adapted blocks."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n_blocks = len(model.layers)
    num_layers = n_blocks if config.lora.num_layers in (-1, 0) else min(config.lora.num_layers, n_blocks)
    block_modules = {name for name, _ in model.layers[0].named_modules()}
    missing = [k for k in config.lora.keys if k not in block_modules]
    if missing:
        raise ValueError(f"LoRA keys {missing} are not modules of this model's blocks; available: {sorted(k for k in block_modules if k)}")
    model.freeze()
    linear_to_lora_layers(model, num_layers, config.lora_parameters())
    use_our_lora(model)
    return num_layers


def use_our_lora(model: nn.Module) -> None:
    """Switch mlx-lm's LoRA layers in `model` to ours (same fields and adapter file, computing in the input's
    dtype), so that serving (CORTEX) computes exactly what training did."""
    theirs, ours = _lora_classes()
    for module in model.modules():
        if type(module) is theirs:  # same fields, only __call__ differs: switch the class in place
            module.__class__ = ours


def checkpoint_blocks(model: nn.Module, every: int = 1, scope: str = "block") -> int:
    """Gradient checkpointing: blocks 0, every, 2 * every, ... recompute their activations in the backward
    pass (`mx.checkpoint`) instead of keeping them; returns how many. scope "block" recomputes the whole
    block; "mlp" only its feed-forward part (`block.mlp`), whose [tokens, intermediate] activations are
    most of what a block keeps, for the price of its matmuls alone (no attention, norms or LoRA recomputed).
    Per instance, by switching the module's class: mlx-lm's `grad_checkpoint` patches the block class
    itself, which a teacher of the same architecture (and every later model in the process) shares."""
    if scope not in ("block", "mlp"):
        raise ValueError(f"grad_checkpoint_scope must be 'block' or 'mlp', not {scope!r}")
    picked = model.layers[::every]
    if scope == "mlp":
        if no_mlp := [type(b).__name__ for b in picked if not isinstance(getattr(b, "mlp", None), nn.Module)]:
            raise ValueError(f"grad_checkpoint_scope='mlp' needs blocks with an `mlp` sub-module; {no_mlp[0]} has "
                             "none: use grad_checkpoint_scope='block'")
        picked = [b.mlp for b in picked]
    for module in picked:
        if not getattr(type(module), "_conch_checkpointed", False):
            module.__class__ = _checkpointed_class(type(module))
    return len(picked)


@cache
def _checkpointed_class(cls: type) -> type:
    call = cls.__call__

    def __call__(self, *args, **kwargs):
        def inner(params, *args, **kwargs):
            self.update(params)  # the tracers of the trainable parameters, so they get gradients
            return call(self, *args, **kwargs)

        return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

    return type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__, "_conch_checkpointed": True})


def adapter_config(config: KDConfig, num_layers: int, extra: dict | None = None) -> dict:
    """mlx-lm's adapter_config.json (read by mlx_lm.load/generate/fuse), plus our provenance. "model" is what
    stock mlx-lm can load: the student's folder for a local or offline model, else its hub id."""
    from conch_dna.models import model_path

    folder = model_path(config.student_model_id)
    return {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": config.lora_parameters(),
        "model": str(folder.resolve()) if folder is not None else config.student_model_id,
        "conch_kd": {
            "teacher": config.teacher_model_id,
            "temperature": config.temperature,
            "alpha": config.alpha,
            "divergence": config.divergence,
            "jsd_beta": config.jsd_beta,
            **(extra or {}),
        },
    }


def save_adapter(model: nn.Module, folder: Path, config_dict: dict) -> Path:
    """adapters.safetensors + adapter_config.json in `folder`, each written atomically (config first:
    mlx-lm reads the config to build the layers, then validates the weights' names and shapes)."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    atomic_write(folder / "adapter_config.json", lambda p: p.write_text(json.dumps(config_dict, indent=2)))
    fault_point("adapter")
    atomic_write(folder / "adapters.safetensors", lambda p: mx.save_safetensors(str(p), weights, {"format": "mlx"}))
    return folder / "adapters.safetensors"


# --------------------------------------------------------------------------------------- optimizer


def build_optimizer(config: KDConfig) -> optim.Optimizer:
    lr, steps, warm = config.learning_rate, config.iters, min(config.warmup_steps, config.iters)
    main = steps - warm
    if config.lr_schedule == "cosine":
        schedule = optim.cosine_decay(lr, max(main, 1), lr * 0.1)
    elif config.lr_schedule == "linear":
        schedule = optim.linear_schedule(lr, lr * 0.1, max(main, 1))
    else:
        schedule = lr
    if warm:
        schedule = optim.join_schedules([optim.linear_schedule(lr / warm, lr, warm), schedule if callable(schedule) else (lambda _: lr)], [warm])
    return optim.AdamW(learning_rate=schedule, weight_decay=config.weight_decay)


# --------------------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a complete one has state.json; temp folders start with '.')."""
    return sorted(p for p in out_dir.glob("checkpoint_*") if (p / "state.json").is_file())


def save_checkpoint(model, optimizer, out_dir: Path, step: int, state: dict, config_dict: dict, keep: int) -> Path:
    final = out_dir / f"checkpoint_{step:06d}"
    with atomic_folder(final) as tmp:
        mx.save_safetensors(str(tmp / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        (tmp / "adapter_config.json").write_text(json.dumps(config_dict, indent=2))
        fault_point("checkpoint")
        digests = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
        # state.json last: a checkpoint folder is complete iff it has one (and the rename made it visible).
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "sha256": digests}, indent=2))
    for old in checkpoint_dirs(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(model, optimizer, ckpt: Path) -> dict:
    try:
        state = json.loads((ckpt / "state.json").read_text())
        for name, digest in state.get("sha256", {}).items():
            if sha256_file(ckpt / name) != digest:
                raise ValueError(f"{name} does not match the sha256 recorded when it was saved")
        adapters = mx.load(str(ckpt / "adapters.safetensors"))
        opt_state = mx.load(str(ckpt / "optimizer.safetensors"))
    except Exception as e:
        raise CheckpointError(f"checkpoint {ckpt} is unreadable ({e}); delete it to resume from an earlier one") from e
    model.load_weights(list(adapters.items()), strict=False)
    optimizer.state = tree_unflatten(list(opt_state.items()))
    return state


# ------------------------------------------------------------------------------------------- steps


def _seed_for(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**31)


def student_logits(model, tokens, vocab: int | None = None):
    """The student's logits, cut to the shared real vocabulary when its embedding matrix is padded wider."""
    logits = model(tokens)
    return logits[..., :vocab] if vocab is not None and vocab < logits.shape[-1] else logits


def dense_targets(targets, vocab: int | None = None):
    """Teacher targets as the reference loss takes them: `TeacherStates` become logits here."""
    if isinstance(targets, TeacherStates):
        logits = targets.head(targets.hidden).astype(mx.float32)
        return logits[..., :vocab] if vocab is not None else logits
    return targets


def _loss_fn(model, tokens, loss_mask, targets, cfg: KDConfig, vocab: int | None = None, fused: bool = False,
             compiled: bool = False):
    if isinstance(targets, CrossTargets):  # different tokenizers: aligned positions, mapped vocabularies
        out = cross_objective(model(tokens), targets, tokens, loss_mask, cfg.alpha, cfg.temperature, cfg.divergence,
                              cfg.jsd_beta, cfg.uld_weight, cfg.uld_top_k)
        return out["loss"], out
    if fused and not isinstance(targets, mx.array):
        out = fused_objective(model, targets, tokens, loss_mask, alpha=cfg.alpha, temperature=cfg.temperature,
                              divergence=cfg.divergence, beta=cfg.jsd_beta, chunk_size=cfg.loss_chunk_size, vocab=vocab,
                              compiled=compiled)
        return out["loss"], out
    logits = student_logits(model, tokens, vocab)
    out = kd_objective(logits, dense_targets(targets, vocab), tokens, loss_mask, cfg.alpha, cfg.temperature,
                       cfg.divergence, cfg.jsd_beta)
    return out["loss"], out


def use_compile(config: KDConfig) -> bool:
    """compile_step "auto": on a GPU only. On the CPU the fused loss's NumPy chunk beats compiled MLX."""
    return config.compile_step == "on" or (config.compile_step == "auto" and mx.default_device() == mx.gpu)


def use_prefetch(config: KDConfig) -> bool:
    """teacher_prefetch "auto": on, except with on-policy sequences (the next batch holds answers the student
    has not written yet). The teacher's pass fills the room the student's step leaves: +14% on an H100
    (Qwen2.5 1.5B -> 0.5B); on 2 CPU cores +16% for tiny models, nothing measurable for the default pair
    (docs/benchmarks.md)."""
    return config.teacher_prefetch != "off" and config.on_policy_lambda == 0


@contextmanager
def memory_limit(gb: float | None):
    """MLX's memory limit set to `gb` for the block, then put back. Past the limit MLX waits for work in
    flight to finish (and free its temporaries) before it queues more: on an H100 this took the peak of a
    checkpointed Qwen2.5 1.5B -> 0.5B step from 15.3 to 11.9 GB at the same speed (docs/benchmarks.md)."""
    if gb is None:
        yield
        return
    previous = mx.set_memory_limit(int(gb * 2**30))
    try:
        yield
    finally:
        mx.set_memory_limit(previous)


def compile_loss_and_grad(model: nn.Module, loss_and_grad: Callable) -> Callable:
    """`loss_and_grad(model, tokens, mask, targets)`, compiled with `mx.compile` for the fused loss's targets.

    Why: MLX's GPU backends launch one kernel per elementwise op; compiled, the student's norms, residual
    adds, LoRA adds and casts fuse across its forward and backward pass (Qwen2.5-0.5B, 8 x 1024 tokens on
    an H100: forward + backward 78 -> 57 ms; with the compiled update, the KD step 44.9k -> 62.7k tokens/s;
    docs/benchmarks.md). Only arrays can be inputs of a compiled function, so
    `TeacherStates` passes its hidden states and keeps its head (the frozen teacher's output layer) as a
    constant: one compiled function per head. Dense-logit and cross-tokenizer targets run eagerly. MLX
    recompiles for every new input shape: pad batches to a multiple (`pad_batch(multiple=...)`).
    """
    state = [model.state, mx.random.state]  # read and written by the compiled function (LoRA dropout: RNG)
    compiled: dict = {}

    def compiled_for(key, make_targets):
        if key not in compiled:
            def fn(tokens, mask, *arrays):
                return loss_and_grad(model, tokens, mask, make_targets(*arrays))
            compiled[key] = mx.compile(fn, inputs=state, outputs=state)
        return compiled[key]

    def call(model_, tokens, mask, targets):
        if model_ is not model:
            raise ValueError("compile_loss_and_grad: called with a different model than it was compiled for")
        if isinstance(targets, TeacherStates):
            head = targets.head
            return compiled_for(("hidden", head), lambda h: TeacherStates(h, head))(tokens, mask, targets.hidden)
        if isinstance(targets, SparseTargets):
            return compiled_for("sparse", SparseTargets)(tokens, mask, *targets)
        return loss_and_grad(model, tokens, mask, targets)

    return call


def top1_agreement(student_logits, targets, tokens, loss_mask) -> tuple[mx.array, mx.array]:
    """(number of scored positions where argmax student == argmax teacher, number of scored positions)."""
    s, _, mask = next_token_view(student_logits, tokens, loss_mask)
    if isinstance(targets, SparseTargets):
        best = mx.argmax(targets.logits, axis=-1, keepdims=True)
        t_top = mx.take_along_axis(targets.indices, best, axis=-1)[..., 0][:, :-1]
    else:
        t_top = mx.argmax(targets[:, :-1], axis=-1)
    agree = (mx.argmax(s, axis=-1) == t_top) & mask
    return agree.sum(), mask.sum()


def evaluate(model, examples: list[Example], targets_fn: TargetsFn, cfg: KDConfig, batch_size: int, vocab: int | None = None) -> dict:
    """Token-weighted validation losses and teacher-student top-1 agreement over all of `examples`."""
    sums = {"kd": 0.0, "ce": 0.0, "loss": 0.0}
    n_tok = n_agree = 0.0
    cross = {"aligned": 0.0, "agree": 0.0, "coverage": 0.0}
    for start in range(0, len(examples), batch_size):
        idx = list(range(start, min(start + batch_size, len(examples))))
        tokens, mask = pad_batch([examples[i] for i in idx])
        targets = dense_targets(targets_fn(idx, "val", tokens), vocab)
        logits = student_logits(model, tokens, vocab)
        if isinstance(targets, CrossTargets):
            # KD is a mean over aligned positions, CE over response tokens: each weighted by its own count.
            out = cross_objective(logits, targets, tokens, mask, 0.5, cfg.temperature, cfg.divergence, cfg.jsd_beta,
                                  cfg.uld_weight, cfg.uld_top_k)
            agree, n_al = cross_agreement(logits, targets)
            mx.eval(out, agree, n_al)
            n, n_al = out["ntokens"].item(), n_al.item()
            sums["ce"] += out["ce"].item() * n
            sums["kd"] += out["kd"].item() * n_al
            n_tok += n
            cross["aligned"] += n_al
            cross["agree"] += agree.item()
            cross["coverage"] += out["coverage"].item() * n_al
            continue
        # Both parts are always measured (alpha 0.5), whatever alpha trains: an SFT run's KD is reported too.
        out = kd_objective(logits, targets, tokens, mask, 0.5, cfg.temperature, cfg.divergence, cfg.jsd_beta)
        out["loss"] = cfg.alpha * out["kd"] + (1.0 - cfg.alpha) * out["ce"]
        agree, n = top1_agreement(logits, targets, tokens, mask)
        mx.eval(out, agree, n)
        n = n.item()
        for k in sums:
            sums[k] += out[k].item() * n
        n_tok += n
        n_agree += agree.item()
    d = max(n_tok, 1.0)
    if cross["aligned"]:
        a = cross["aligned"]
        kd, ce = sums["kd"] / a, sums["ce"] / d
        return {"val_kd": kd, "val_ce": ce, "val_loss": cfg.alpha * kd + (1.0 - cfg.alpha) * ce,
                "val_agreement": cross["agree"] / a, "val_tokens": int(n_tok), "val_aligned": int(a),
                "val_coverage": cross["coverage"] / a}
    return {"val_kd": sums["kd"] / d, "val_ce": sums["ce"] / d, "val_loss": sums["loss"] / d,
            "val_agreement": n_agree / d, "val_tokens": int(n_tok)}


# -------------------------------------------------------------------------------------------- loop


def train_with_kd(
    model: nn.Module,
    train: list[Example],
    val: list[Example],
    targets_fn: TargetsFn,
    config: KDConfig,
    out_dir: Path,
    *,
    adapter_cfg: dict,
    resume: bool = False,
    vocab: int | None = None,
    on_event: EventFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    student_writes: Callable[[list[Example]], list[Example]] | None = None,
) -> dict:
    """Train the (already LoRA-wrapped) `model`; returns a summary of losses, tokens and time.

    Events (for signals and tests): "step" every step, "validation", "checkpoint". Raises
    `TrainingDivergedError` on a non-finite loss and `TrainingCancelled` when `should_stop()` is true.

    With teacher prefetch (`use_prefetch`), `targets_fn` is called for the next training micro-batch inside
    `mx.stream(<teacher stream>)` before this one's student step is queued; it may return targets still being
    computed (`mx.async_eval`), and the trainer waits for them when it evaluates the step.
    """
    with memory_limit(config.memory_limit_gb):
        return _train(model, train, val, targets_fn, config, out_dir, adapter_cfg=adapter_cfg, resume=resume,
                      vocab=vocab, on_event=on_event, should_stop=should_stop, student_writes=student_writes)


def _train(model, train, val, targets_fn, config, out_dir, *, adapter_cfg, resume, vocab, on_event, should_stop,
           student_writes) -> dict:
    if not train:
        raise ValueError("no training examples: give more prompts or lower val_fraction")
    emit = on_event or (lambda name, **kw: None)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    optimizer = build_optimizer(config)
    optimizer.init(model.trainable_parameters())
    fused = config.loss_impl == "fused" and parts_match(model)
    if config.loss_impl == "fused" and not fused:
        log.warning("fused loss unavailable for this model (head(body(x)) != model(x)); using the reference loss")
    if config.grad_checkpoint:
        checkpoint_blocks(model, config.grad_checkpoint_every, config.grad_checkpoint_scope)
    compiled = fused and use_compile(config)
    loss_and_grad = nn.value_and_grad(model, lambda m, *a: _loss_fn(m, *a, config, vocab, fused, compiled))
    if compiled:
        loss_and_grad = compile_loss_and_grad(model, loss_and_grad)
    pad_multiple = 32 if compiled else 1  # few distinct shapes, few compilations

    start_step, best = 0, {"train_loss": math.inf, "val_loss": math.inf, "val_kd": math.inf, "val_ce": math.inf}
    tokens_seen = 0
    for stale in out_dir.glob(".checkpoint_*.tmp-*") if dist.is_writer() else ():  # left by a crash while saving
        shutil.rmtree(stale, ignore_errors=True)
    last = {}
    if resume and (ckpts := checkpoint_dirs(out_dir)):
        state = load_checkpoint(model, optimizer, ckpts[-1])
        start_step, best, tokens_seen = state["step"], state.get("best", best), state.get("tokens", 0)
        last = state.get("last", {})
        log.info("resumed", checkpoint=str(ckpts[-1]), step=start_step)
        if start_step > config.iters:
            raise CheckpointError(f"the checkpoint in {out_dir} is at step {start_step}, past iters={config.iters}; "
                                  "raise --iters, or start afresh without --resume")
    if dist.is_writer():
        _truncate_metrics(metrics_path, start_step)

    if start_step == 0 and val:
        # The untrained student's figures: the baseline every later validation is compared with.
        v0 = evaluate(model, val, targets_fn, config, config.batch_size, vocab)
        best["initial_val_kd"], best["initial_val_loss"] = v0["val_kd"], v0["val_loss"]
    if start_step == 0 and val and dist.is_writer():
        _append_metrics(metrics_path, {"type": "val", "step": 0, **v0})
        log.info("validation", step=0, **{k: round(x, 5) if isinstance(x, float) else x for k, x in v0.items()})
        emit("validation", step=0, **v0)
    global_batch = config.batch_size * config.grad_accumulation
    if global_batch < dist.size():
        raise ValueError(f"batch_size x grad_accumulation = {global_batch} is smaller than the {dist.size()} processes; "
                         "every process needs at least one example per step")
    last_ckpt = checkpoint_dirs(out_dir)[-1] if checkpoint_dirs(out_dir) else None
    update = make_update(model, optimizer, config.max_grad_norm, use_compile(config))  # after a resume: see there

    def micro_batches(idx: list[int], examples: list[Example]) -> list[tuple[list[int], list[Example]]]:
        """This process's micro-batches of a step's batch (`idx` into train, and its examples), none empty:
        (indices, examples) each. Data parallel: this process takes positions rank, rank + size, ... of it."""
        shard = list(range(dist.rank(), len(idx), dist.size()))
        per_micro = -(-len(shard) // config.grad_accumulation)
        parts = [shard[m * per_micro : (m + 1) * per_micro] for m in range(config.grad_accumulation)]
        return [([idx[p] for p in part], [examples[p] for p in part]) for part in parts if part]

    prefetch = use_prefetch(config)
    teacher_stream = mx.new_stream(mx.default_device()) if prefetch else None
    launched: dict[tuple[int, int], tuple] = {}  # (step, micro-batch) -> (tokens, mask, targets being computed)
    if dist.is_writer():
        ckpt = config.grad_checkpoint and f"{config.grad_checkpoint_scope} every {config.grad_checkpoint_every}"
        log.info("training", steps=config.iters - start_step, fused_loss=fused, compiled=compiled,
                 teacher_prefetch=prefetch, grad_checkpoint=ckpt, memory_limit_gb=config.memory_limit_gb)

    def launch(step: int, m: int, micro: list[int], examples: list[Example]) -> None:
        tokens, mask = pad_batch(examples, multiple=pad_multiple)
        with mx.stream(teacher_stream):
            launched[(step, m)] = tokens, mask, targets_fn(micro, "train", tokens)

    show_bar = sys.stderr.isatty() and dist.is_writer()
    t_start = time.perf_counter()
    train_seconds = 0.0
    for step in range(start_step, config.iters):
        if should_stop is not None and should_stop():
            raise TrainingCancelled(f"cancelled before step {step + 1}")
        t0 = time.perf_counter()
        mx.random.seed(_seed_for(config.seed, step))
        idx = batch_order(len(train), global_batch, config.seed, step)
        grads_sum, sums, n_step = None, {"loss": 0.0, "kd": 0.0, "ce": 0.0}, 0.0
        batch_examples = [train[i] for i in idx]
        if config.on_policy_lambda > 0 and student_writes is not None:
            # On-policy share: the current student answers these prompts; the teacher scores its tokens.
            pick = np.random.default_rng([config.seed, step, 7]).random(len(idx)) < config.on_policy_lambda
            mine = np.zeros(len(idx), bool)
            mine[dist.rank() :: dist.size()] = True
            pick &= mine  # each process writes the answers of its own shard only
            if pick.any():
                model.eval()
                written = iter(student_writes([e for e, p in zip(batch_examples, pick) if p]))
                model.train()
                batch_examples = [next(written) if p else e for e, p in zip(batch_examples, pick)]
        batches = micro_batches(idx, batch_examples)
        for m, (micro, examples) in enumerate(batches):
            if prefetch:
                if (step, m) not in launched:  # the first micro-batch of a run
                    launch(step, m, micro, examples)
                tokens, mask, targets = launched.pop((step, m))
                # The next micro-batch's teacher pass goes on its own stream now, so that it runs beside this
                # one's student step (queued next) instead of after it.
                if m + 1 < len(batches):
                    launch(step, m + 1, *batches[m + 1])
                elif step + 1 < config.iters:
                    next_idx = batch_order(len(train), global_batch, config.seed, step + 1)
                    launch(step + 1, 0, *micro_batches(next_idx, [train[i] for i in next_idx])[0])
            else:
                tokens, mask = pad_batch(examples, multiple=pad_multiple)
                targets = targets_fn(micro, "train", tokens)
            (loss, out), grads = loss_and_grad(model, tokens, mask, targets)
            n = out["ntokens"]
            grads_sum = accumulate(grads_sum, grads, n)
            mx.eval(grads_sum, out)
            nv = n.item()
            for k in sums:
                sums[k] += out[k].item() * nv
            n_step += nv
        if dist.size() > 1:  # two collectives per step: the flattened gradient sums, then the scalar sums
            grads_sum = dist.all_sum_tree(grads_sum)
            n_step, *totals = dist.all_sum_floats([n_step, *sums.values()])
            sums = dict(zip(sums, totals))
        if n_step == 0:
            raise ValueError(f"step {step + 1}: the batch has no response tokens to learn from (empty responses?)")
        loss_value = sums["loss"] / n_step
        if not math.isfinite(loss_value):
            raise TrainingDivergedError(step + 1, last_ckpt, loss_value)
        fault_point("step")
        grad_norm = update(grads_sum, mx.array(1.0 / n_step, dtype=mx.float32))
        mx.eval(grad_norm, model.trainable_parameters(), optimizer.state)
        lr = optimizer.learning_rate.item()  # after update: the rate this step used
        dt = time.perf_counter() - t0
        train_seconds += dt
        tokens_seen += int(n_step)
        s = step + 1
        last = {"step": s, "loss": loss_value, "kd": sums["kd"] / n_step, "ce": sums["ce"] / n_step, "lr": lr,
                "tokens_per_second": n_step / dt, "peak_memory_gb": mx.get_peak_memory() / 1e9, "tokens": tokens_seen,
                "grad_norm": grad_norm.item()}
        best["train_loss"] = min(best["train_loss"], loss_value)
        if dist.is_writer():
            _append_metrics(metrics_path, {"type": "train", **last})
            emit("step", **last)
        if show_bar:
            print(f"\r[{s}/{config.iters}] loss {loss_value:.4f} kd {last['kd']:.4f} ce {last['ce']:.4f} "
                  f"{last['tokens_per_second']:.0f} tok/s", end="" if s < config.iters else "\n", file=sys.stderr, flush=True)
        if s % config.val_interval == 0 or s == config.iters:
            if val:
                v = evaluate(model, val, targets_fn, config, config.batch_size, vocab)
                for k in ("val_loss", "val_kd", "val_ce"):
                    best[k] = min(best[k], v[k])
                last.update(v)
                if dist.is_writer():
                    _append_metrics(metrics_path, {"type": "val", "step": s, **v})
                    log.info("validation", **{"step": s, **{k: round(x, 5) if isinstance(x, float) else x for k, x in v.items()}})
                    emit("validation", step=s, **v)
        if s % config.checkpoint_interval == 0 or s == config.iters:
            if dist.is_writer():
                last_ckpt = save_checkpoint(model, optimizer, out_dir, s, {"best": best, "tokens": tokens_seen, "last": last},
                                            adapter_cfg, config.keep_checkpoints)
                emit("checkpoint", step=s, path=str(last_ckpt))
            dist.barrier()
        if (s % max(1, config.iters // 10) == 0 or s == config.iters) and dist.is_writer():
            log.info("step", step=s, loss=round(loss_value, 5), kd=round(last["kd"], 5), ce=round(last["ce"], 5),
                     lr=lr, tokens_per_second=round(last["tokens_per_second"], 1))
    return {"final": last, "best": best, "tokens": tokens_seen, "train_seconds": train_seconds,
            "wall_seconds": time.perf_counter() - t_start, "start_step": start_step,
            "last_checkpoint": str(last_ckpt) if last_ckpt else None}


def accumulate(grads_sum, grads, n):
    """grads_sum + n * grads (token-weighted: the step's gradient is that of the mean over all its tokens)."""
    if grads_sum is None:
        return tree_map(lambda g: g * n, grads)
    return tree_map(lambda a, g: a + g * n, grads_sum, grads)


def make_update(model: nn.Module, optimizer: optim.Optimizer, max_grad_norm: float, compiled: bool) -> Callable:
    """update(grads_sum, inv_n): the step's mean gradient, clipped to `max_grad_norm`, applied by the
    optimizer; returns the gradient norm before clipping. Compiled on GPUs: eagerly, scaling, clipping and
    AdamW launch ~15 small kernels per LoRA matrix (~3,000 a step for a 24-block student with 4 adapted
    projections). Build it after a resume has replaced `optimizer.state`: the compiled function keeps
    the state objects it was given."""

    def update(grads_sum, inv_n):
        grads = tree_map(lambda g: g * inv_n, grads_sum)
        if max_grad_norm > 0:
            grads, norm = optim.clip_grad_norm(grads, max_grad_norm)
        else:
            norm = mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(grads)))
        optimizer.update(model, grads)
        return norm

    if not compiled:
        return update
    state = [model.state, optimizer.state]
    return mx.compile(update, inputs=state, outputs=state)


def _append_metrics(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the loss curve consistent after a resume: drop rows logged after the resumed step."""
    if not path.exists():
        return
    rows = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = []
    for ln in rows:
        try:
            if json.loads(ln).get("step", 0) <= step:
                kept.append(ln)
        except json.JSONDecodeError:
            continue
    atomic_write(path, lambda p: p.write_text("".join(k + "\n" for k in kept)))


__all__ = [
    "TrainingCancelled", "TrainingDivergedError", "adapter_config", "apply_lora", "build_optimizer",
    "checkpoint_dirs", "evaluate", "save_adapter", "top1_agreement", "train_with_kd",
]
