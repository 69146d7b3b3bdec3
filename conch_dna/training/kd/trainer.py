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
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import structlog
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from conch_dna._faults import fault_point
from conch_dna.atomic import ForeignFolderError, atomic_folder, atomic_write, remove_folder, sha256_file
from conch_dna.training.kd import distributed as dist
from conch_dna.training.kd import kernels
from conch_dna.training.kd.config import KDConfig
from conch_dna.training.kd.cross_vocab import CrossTargets, cross_agreement, cross_objective
from conch_dna.training.kd.data import Example, batch_order, pad_batch
from conch_dna.training.kd.flat import FlatLayout
from conch_dna.training.kd.fused import TeacherStates, fused_objective, parts_match
from conch_dna.training.kd.losses import SparseTargets, kd_objective, next_token_view
from conch_dna.training.kd.report import Checkpoint, Event, Reporter, Step, Validation, quiet

log = structlog.get_logger(__name__)

# targets_fn(indices into the data split, "train" | "val", padded tokens [B, L]) -> dense logits or SparseTargets
TargetsFn = Callable[[list[int], str, mx.array], "mx.array | SparseTargets"]


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


def checkpoint_blocks(model: nn.Module, every: int = 1, scope: str = "block", whole: int = 0) -> int:
    """Gradient checkpointing: blocks 0, every, 2 * every, ... recompute their activations in the backward
    pass (`mx.checkpoint`) instead of keeping them; returns how many. scope "block" recomputes the whole
    block; "mlp" only its feed-forward part (`block.mlp`), whose [tokens, intermediate] activations are
    most of what a block keeps, for the price of its matmuls alone (no attention, norms or LoRA recomputed);
    with "mlp", the first `whole` of the picked blocks are recomputed whole all the same: a memory between the
    two scopes, one block at a time. Per instance, by switching the module's class: mlx-lm's
    `grad_checkpoint` patches the block class itself, which a teacher of the same architecture (and every
    later model in the process) shares."""
    kinds = block_kinds(len(model.layers), every, scope, whole)
    mlp_blocks = [b for b, kind in zip(model.layers, kinds) if kind == "mlp"]
    if no_mlp := [type(b).__name__ for b in mlp_blocks if not isinstance(getattr(b, "mlp", None), nn.Module)]:
        raise ValueError(f"grad_checkpoint_scope='mlp' needs blocks with an `mlp` sub-module; {no_mlp[0]} has "
                         "none: use grad_checkpoint_scope='block'")
    for module in [b for b, kind in zip(model.layers, kinds) if kind == "whole"] + [b.mlp for b in mlp_blocks]:
        if not getattr(type(module), "_conch_checkpointed", False):
            module.__class__ = _checkpointed_class(type(module))
    return len(kinds) - kinds.count("plain")


def block_kinds(layers: int, every: int = 1, scope: str = "block", whole: int = 0) -> list[str]:
    """What `checkpoint_blocks` does to each block, first to last: "plain" (keeps its activations), "mlp"
    (recomputes its MLP) or "whole" (recomputes all of it)."""
    if scope not in ("block", "mlp"):
        raise ValueError(f"grad_checkpoint_scope must be 'block' or 'mlp', not {scope!r}")
    kinds = ["plain"] * layers
    picked = range(0, layers, every)
    for n, i in enumerate(picked):
        kinds[i] = "whole" if scope == "block" or n < whole else "mlp"
    return kinds


def checkpoint_setting(config: KDConfig) -> str | None:
    """The checkpointing a config asks for, in words ("mlp every 1, first 6 whole"), or None."""
    if not config.grad_checkpoint:
        return None
    whole = config.grad_checkpoint_scope == "mlp" and config.grad_checkpoint_whole_blocks
    return f"{config.grad_checkpoint_scope} every {config.grad_checkpoint_every}" + (f", first {whole} whole" if whole else "")


def lean_backward(model: nn.Module, norms: bool = True, mlps: bool = True) -> dict[str, int]:
    """Two rewrites of a LoRA student's frozen parts so that its backward pass computes and keeps only what the
    LoRA gradients need (same forward values; returns how many modules of each kind were rewritten):

    - RMSNorms with a frozen weight take the gradient of normalising without it and multiplying by it
      afterwards (`_rms_norm_frozen_weight`; the forward is MLX's fused norm, same values). MLX's RMSNorm backward
      always computes the weight's gradient, a [tokens, D] product summed over tokens that nobody reads when
      the weight is frozen: on an H200 those sums were 5.7 of a Qwen2.5-0.5B student's 53 ms forward +
      backward (8 x 1024 tokens; `benchmarks/profile_student.py --kernels`).
    - SwiGLU MLPs (mlx-lm's `down_proj(swiglu(gate_proj(x), up_proj(x)))`, most of its dense architectures)
      use `kernels.swiglu`, whose backward recomputes the sigmoid instead of keeping silu(gate) and
      sigmoid(gate): fewer [tokens, intermediate] activations kept per block (one measured on the CPU; on an
      H200 the step's peak fell 2.3 GB at batch 8 x 1024, about 1.2 of them), and its forward one kernel.

    Per instance, by switching the module's class, like `checkpoint_blocks`."""
    counts = {"norms": 0, "mlps": 0}
    for module in model.modules():
        if norms and type(module) is nn.RMSNorm and "weight" not in module.trainable_parameters():
            module.__class__, counts["norms"] = _RMSNormWeightAfter, counts["norms"] + 1
        elif mlps and kernels.is_swiglu_mlp(module):
            module.__class__, counts["mlps"] = kernels.swiglu_mlp_class(type(module)), counts["mlps"] + 1
    return counts


class _RMSNormWeightAfter(nn.RMSNorm):
    def __call__(self, x):
        return _rms_norm_frozen_weight(self.eps)(x, self.weight)


@cache
def _rms_norm_frozen_weight(eps: float) -> Callable:
    """f(x, w): the values of `mx.fast.rms_norm(x, w, eps)` (one kernel), with the gradient of
    `mx.fast.rms_norm(x, None, eps) * w` with respect to x only (MLX's weightless norm backward): the forward of
    that product and this are the same bits (x * r rounded, then times w rounded), so only the separate
    multiply goes (on an H200 one [tokens, D] kernel per norm call, 2.8 ms of a batch-16 step's 249)."""

    @mx.custom_function
    def f(x, w):
        return mx.fast.rms_norm(x, w, eps)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        x, w = primals
        _, (dx,) = mx.vjp(lambda a: mx.fast.rms_norm(a, None, eps), [x], [cotangent * w])
        return dx, mx.zeros_like(w)  # the weight is frozen: its gradient is never read

    return f


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
            **{k: v for k, v in config.model_dump(mode="json").items() if k in RUN_SETTINGS},
            "batch": config.batch_size * config.grad_accumulation,
            **(extra or {}),
        },
    }


# What a run trains on, besides the adapter's shape: a resume that would change one of these mixes two runs in
# one adapter, so it is refused (`run_differences`). Memory and speed settings, and iters, may change.
RUN_SETTINGS = ("temperature", "alpha", "divergence", "jsd_beta", "unlikelihood", "no_repeat_teacher", "own_answers",
                "on_policy_lambda", "teacher_targets", "top_k", "uld_weight", "uld_top_k", "text", "text_share",
                "text_max_tokens", "seed", "max_seq_length", "learning_rate", "lr_schedule", "warmup_steps",
                "weight_decay", "max_grad_norm", "generation")
# Recorded for information only, or settled during the run.
RUN_FREE = {"run_id", "teacher"}


def run_differences(saved_cfg: dict, run_cfg: dict) -> list[str]:
    """What a checkpoint was trained on that this run would not train on: the settings, the teacher's weights,
    the domain and the data (`conch_kd` of the two adapter configs). Keys a checkpoint did not record, and a
    learning rate this run has not settled yet, are not compared."""
    saved, run = saved_cfg.get("conch_kd") or {}, run_cfg.get("conch_kd") or {}
    return [f"{key}: checkpoint {saved[key]!r}, this run {run.get(key)!r}" for key in sorted(saved)
            if key not in RUN_FREE and not (key == "learning_rate" and run.get(key) is None) and saved[key] != run.get(key)]


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
    # The distiller settles an unset learning rate by the adapter's start; called directly it is a zero start.
    lr, steps, warm = config.learning_rate_for(False), config.iters, min(config.warmup_steps, config.iters)
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
        layout = FlatLayout.of(model.trainable_parameters())
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(per_parameter_state(optimizer.state, layout))))
        (tmp / "adapter_config.json").write_text(json.dumps(config_dict, indent=2))
        fault_point("checkpoint")
        digests = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
        # state.json last: a checkpoint folder is complete iff it has one (and the rename made it visible).
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "sha256": digests}, indent=2))
    for old in checkpoint_dirs(out_dir)[:-keep]:
        try:
            remove_folder(old)
        except ForeignFolderError as e:  # someone put their own files there: keep the folder, say so
            log.warning("old checkpoint kept", reason=str(e))
    return final


def load_checkpoint(model, optimizer, ckpt: Path, adapter_cfg: dict | None = None) -> dict:
    """Load `ckpt`'s adapter and optimizer state into `model` and `optimizer`; its state.json. Refused
    (`CheckpointError`, nothing loaded) when it is unreadable, or when it holds another adapter than this
    run trains: other LoRA settings, layers or student (`adapter_cfg`), other parameter names or shapes."""
    try:
        state = json.loads((ckpt / "state.json").read_text())
        for name, digest in state.get("sha256", {}).items():
            if sha256_file(ckpt / name) != digest:
                raise ValueError(f"{name} does not match the sha256 recorded when it was saved")
        adapters = mx.load(str(ckpt / "adapters.safetensors"))
        opt_state = mx.load(str(ckpt / "optimizer.safetensors"))
        saved_cfg = json.loads((ckpt / "adapter_config.json").read_text())
    except Exception as e:
        raise CheckpointError(f"checkpoint {ckpt} is unreadable ({e}); delete it to resume from an earlier one") from e
    _refuse_other_adapter(ckpt, checkpoint_differences(saved_cfg, adapter_cfg or saved_cfg, adapters, model))
    model.load_weights(list(adapters.items()), strict=False)
    optimizer.state = tree_unflatten(list(opt_state.items()))
    return state


def check_resumable(out_dir: Path, run_cfg: dict) -> None:
    """Before any work: the latest checkpoint in `out_dir` (if any) was made with this run's LoRA settings,
    student, settings, teacher, domain and data, else `CheckpointError` listing every difference (the arrays
    themselves are compared when it is loaded)."""
    ckpts = checkpoint_dirs(out_dir) if out_dir.is_dir() else []
    if not ckpts:
        return
    try:
        saved = json.loads((ckpts[-1] / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpts[-1]} is unreadable ({e}); delete it to resume from an earlier one") from e
    _refuse_other_adapter(ckpts[-1], checkpoint_differences(saved, run_cfg, keys=("fine_tune_type", "lora_parameters", "model"))
                          + run_differences(saved, run_cfg))


def _refuse_other_adapter(ckpt: Path, differences: list[str]) -> None:
    if differences:
        raise CheckpointError(f"checkpoint {ckpt} holds another adapter than this run trains ({'; '.join(differences)}): "
                              "resume with the settings it was made with, or start afresh without --resume "
                              "(or with another --output)")


def checkpoint_differences(saved_cfg: dict, run_cfg: dict, adapters: dict | None = None, model: nn.Module | None = None,
                           keys=("fine_tune_type", "num_layers", "lora_parameters", "model")) -> list[str]:
    """What a checkpoint holds that this run would not: LoRA settings, adapted layers, the student (`keys` of
    the two adapter configs), and the names and shapes of the adapter's arrays (given `adapters`, `model`)."""
    out = [f"{key}: checkpoint {saved_cfg.get(key)!r}, this run {run_cfg.get(key)!r}"
           for key in keys if saved_cfg.get(key) != run_cfg.get(key)]
    if adapters is None or model is None:
        return out
    mine = dict(tree_flatten(model.trainable_parameters()))
    if missing := sorted(set(mine) - set(adapters)):
        out.append(f"{len(missing)} LoRA arrays missing from it (e.g. {missing[0]})")
    if extra := sorted(set(adapters) - set(mine)):
        out.append(f"{len(extra)} arrays this model does not have (e.g. {extra[0]})")
    if shapes := [k for k in sorted(set(mine) & set(adapters)) if tuple(mine[k].shape) != tuple(adapters[k].shape)]:
        k = shapes[0]
        out.append(f"{len(shapes)} arrays of other shapes (e.g. {k}: checkpoint {tuple(adapters[k].shape)}, "
                   f"this run {tuple(mine[k].shape)})")
    return out


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
                              compiled=compiled, unlikelihood=cfg.unlikelihood,
                              no_repeat_teacher=cfg.no_repeat_teacher)
        return out["loss"], out
    logits = student_logits(model, tokens, vocab)
    out = kd_objective(logits, dense_targets(targets, vocab), tokens, loss_mask, cfg.alpha, cfg.temperature,
                       cfg.divergence, cfg.jsd_beta, cfg.unlikelihood, cfg.no_repeat_teacher)
    return out["loss"], out


def use_compile(config: KDConfig) -> bool:
    """compile_step "auto": on a GPU only. On the CPU the fused loss's NumPy chunk beats compiled MLX."""
    return config.compile_step == "on" or (config.compile_step == "auto" and mx.default_device() == mx.gpu)


def use_lean_backward(config: KDConfig) -> bool:
    """lean_backward "auto": on a GPU only. On 2 CPU cores (smollm2 preset, trainer) it measured 41.5 / 34.1
    tokens/s against 39.8 / 40.1 without: nothing to gain where memory is not scarce."""
    return config.lean_backward == "on" or (config.lean_backward == "auto" and mx.default_device() == mx.gpu)


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


@dataclass
class RunState:
    """What the loop carries from step to step (and a checkpoint restores): the step reached, the best
    losses, the tokens seen, the last step's figures and the newest checkpoint."""

    step: int = 0
    best: dict = field(default_factory=lambda: {"train_loss": math.inf, "val_loss": math.inf, "val_kd": math.inf,
                                                "val_ce": math.inf})
    tokens: int = 0
    last: dict = field(default_factory=dict)
    last_checkpoint: Path | None = None
    train_seconds: float = 0.0


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
    reporter: Callable[[Event], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    student_writes: Callable[[list[Example]], list[Example]] | None = None,
) -> dict:
    """Train the (already LoRA-wrapped) `model`; returns a summary of losses, tokens and time.

    Stages, top to bottom: build the step, start or resume, validate the untrained student, then per step:
    queue its batch's micro-batches (teacher targets, gradients, reduced across processes), finish the step
    before (wait for its figures, report, validate and save), queue the update. `reporter` gets the typed
    events (`report.Step`, `Validation`, `Checkpoint`); the default writes metrics.jsonl in `out_dir` and logs. Raises `TrainingDivergedError` on a non-finite loss
    and `TrainingCancelled` when `should_stop()` is true (after saving a checkpoint at the step reached).
    """
    global_batch = config.batch_size * config.grad_accumulation
    if not train:
        raise ValueError("no training examples: give more prompts or lower val_fraction")
    if global_batch < dist.size():
        raise ValueError(f"batch_size x grad_accumulation = {global_batch} is smaller than the {dist.size()} processes; "
                         "every process needs at least one example per step")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = (reporter or Reporter(out_dir / "metrics.jsonl", log_every=config.iters // 10)) if dist.is_writer() else quiet
    with memory_limit(config.memory_limit_gb):
        loss_and_grad, pad_multiple = build_step(model, config, vocab)
        optimizer = build_optimizer(config)
        optimizer.init(model.trainable_parameters())
        run = start_or_resume(model, optimizer, out_dir, config, adapter_cfg, resume, report)
        if run.step == 0 and val:
            validate(model, val, targets_fn, config, vocab, run, report, step=0)
        update = make_update(model, optimizer, config.max_grad_norm, use_compile(config))  # after a resume: see there
        pipeline = TargetsPipeline(train, targets_fn, config, pad_multiple)
        layout = FlatLayout.of(model.trainable_parameters())  # how each step's gradient is gathered (`make_update`)
        start_step, t_start = run.step, time.perf_counter()
        # The host reads a step's figures only after it has queued the next step's micro-batches: while it
        # waits, reports, validates and saves, the GPU already works on that step. The update is guarded on
        # the GPU (`make_update`), so a diverged step changes nothing before it is reported.
        pending, done_at = None, t_start
        for step in range(run.step, config.iters):
            mx.random.seed(_seed_for(config.seed, step))
            examples = pipeline.examples(step)
            if config.on_policy_lambda > 0 and student_writes is not None:
                examples = on_policy(model, examples, config, step, student_writes)
            grads_sum, sums = micro_batch_steps(model, loss_and_grad, pipeline.batches(step, examples), layout)
            if pending is not None:
                done_at = finish_step(pending, model, optimizer, val, targets_fn, config, vocab, out_dir, adapter_cfg,
                                      run, report)
            if should_stop is not None and should_stop():
                save(model, optimizer, out_dir, config, adapter_cfg, run, report, force=True)
                raise TrainingCancelled(f"cancelled before step {step + 1}; resume from {run.last_checkpoint}")
            grad_norm = update(grads_sum, sums["loss"], sums["n"])
            mx.async_eval(grad_norm, model.trainable_parameters(), optimizer.state)
            pending = QueuedStep(step + 1, sums, grad_norm, started=done_at)
        if pending is not None:
            finish_step(pending, model, optimizer, val, targets_fn, config, vocab, out_dir, adapter_cfg, run, report)
    return {"final": run.last, "best": run.best, "tokens": run.tokens, "train_seconds": run.train_seconds,
            "wall_seconds": time.perf_counter() - t_start, "start_step": start_step,
            "last_checkpoint": str(run.last_checkpoint) if run.last_checkpoint else None}


def build_step(model: nn.Module, config: KDConfig, vocab: int | None) -> tuple[Callable, int]:
    """loss_and_grad(model, tokens, mask, targets) -> ((loss, parts), grads), and the multiple that batches
    are padded to: fused loss when the model splits into body and head, gradient checkpointing, compiled on
    GPUs (few distinct shapes, few compilations)."""
    fused = config.loss_impl == "fused" and parts_match(model)
    if config.loss_impl == "fused" and not fused:
        log.warning("fused loss unavailable for this model (head(body(x)) != model(x)); using the reference loss")
    if use_lean_backward(config):  # before checkpointing, which wraps the classes it switches
        lean_backward(model)
    kernels.use_rope_kernel(model)  # the same rotation; its own kernel on NVIDIA GPUs, nn.RoPE's elsewhere
    if config.grad_checkpoint:
        checkpoint_blocks(model, config.grad_checkpoint_every, config.grad_checkpoint_scope, config.grad_checkpoint_whole_blocks)
    compiled = fused and use_compile(config)
    loss_and_grad = nn.value_and_grad(model, lambda m, *a: _loss_fn(m, *a, config, vocab, fused, compiled))
    if compiled:
        loss_and_grad = compile_loss_and_grad(model, loss_and_grad)
    if dist.is_writer():
        log.info("training", steps=config.iters, fused_loss=fused, compiled=compiled, teacher_prefetch=use_prefetch(config),
                 grad_checkpoint=checkpoint_setting(config), memory_limit_gb=config.memory_limit_gb)
    return loss_and_grad, 32 if compiled else 1


def start_or_resume(model, optimizer, out_dir: Path, config: KDConfig, adapter_cfg: dict, resume: bool,
                    report) -> RunState:
    """A fresh state, or the latest checkpoint's (adapter and optimizer loaded into `model`/`optimizer`)."""
    if dist.is_writer():
        # left by a crash while saving, or while removing an old checkpoint
        for stale in [*out_dir.glob(".checkpoint_*.tmp-*"), *out_dir.glob(".checkpoint_*.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
    ckpts = checkpoint_dirs(out_dir)
    run = RunState(last_checkpoint=ckpts[-1] if ckpts else None)
    if resume and ckpts:
        state = load_checkpoint(model, optimizer, ckpts[-1], adapter_cfg)
        if state["step"] > config.iters:
            raise CheckpointError(f"the checkpoint in {out_dir} is at step {state['step']}, past iters={config.iters}; "
                                  "raise --iters, or start afresh without --resume")
        run.step, run.tokens, run.last = state["step"], state.get("tokens", 0), state.get("last", {})
        run.best = state.get("best", run.best)
        log.info("resumed", checkpoint=str(ckpts[-1]), step=run.step)
    if isinstance(report, Reporter):
        report.resumed(run.step)
    return run


def validate(model, val, targets_fn, config: KDConfig, vocab, run: RunState, report, step: int) -> dict:
    """Validation figures at `step`; step 0 (the untrained student) is the baseline, later ones count for
    the best losses."""
    figures = evaluate(model, val, targets_fn, config, config.batch_size, vocab)
    if step == 0:
        run.best["initial_val_kd"], run.best["initial_val_loss"] = figures["val_kd"], figures["val_loss"]
    else:
        for k in ("val_loss", "val_kd", "val_ce"):
            run.best[k] = min(run.best[k], figures[k])
    report(Validation(step, figures))
    return figures


def save(model, optimizer, out_dir: Path, config: KDConfig, adapter_cfg: dict, run: RunState, report,
         force: bool = False) -> None:
    """A checkpoint every `checkpoint_interval` steps, at the end, and (`force`) when stopping early; rank 0
    writes it, every process waits for it."""
    due = run.step % config.checkpoint_interval == 0 or run.step == config.iters
    done = run.last_checkpoint is not None and run.last_checkpoint.name == f"checkpoint_{run.step:06d}"
    if not (due or force) or done or run.step == 0:
        return
    if dist.is_writer():
        run.last_checkpoint = save_checkpoint(model, optimizer, out_dir, run.step,
                                              {"best": run.best, "tokens": run.tokens, "last": run.last},
                                              adapter_cfg, config.keep_checkpoints)
        report(Checkpoint(run.step, str(run.last_checkpoint)))
    dist.barrier()


def on_policy(model, examples: list[Example], config: KDConfig, step: int, student_writes) -> list[Example]:
    """The on-policy share of a step's batch: the current student answers these prompts, and the teacher
    scores its tokens. Each process writes the answers of its own shard only."""
    pick = np.random.default_rng([config.seed, step, 7]).random(len(examples)) < config.on_policy_lambda
    mine = np.zeros(len(examples), bool)
    mine[dist.rank() :: dist.size()] = True
    pick &= mine
    if not pick.any():
        return examples
    model.eval()
    written = iter(student_writes([e for e, p in zip(examples, pick) if p]))
    model.train()
    return [next(written) if p else e for e, p in zip(examples, pick)]


class TargetsPipeline:
    """A step's micro-batches with their teacher targets. With teacher prefetch (`use_prefetch`), the next
    micro-batch's teacher pass is launched on its own stream before this micro-batch's student step is
    queued, so that the two run side by side (never past the last step)."""

    def __init__(self, train: list[Example], targets_fn: TargetsFn, config: KDConfig, pad_multiple: int):
        self.train, self.targets_fn, self.config, self.pad_multiple = train, targets_fn, config, pad_multiple
        self.global_batch = config.batch_size * config.grad_accumulation
        self.prefetch = use_prefetch(config)
        self.stream = mx.new_stream(mx.default_device()) if self.prefetch else None
        self.launched: dict[tuple[int, int], tuple] = {}  # (step, micro-batch) -> (tokens, mask, targets)

    def examples(self, step: int) -> list[Example]:
        """Global batch `step`, a function of (seed, step) alone (`data.batch_order`)."""
        return [self.train[i] for i in self._order(step)]

    def plan(self, step: int, examples: list[Example]) -> list[tuple[list[int], list[Example]]]:
        """This process's micro-batches of the step's batch, none empty: (indices into train, examples) each.
        Data parallel: this process takes positions rank, rank + size, ... of the batch."""
        idx, micro = self._order(step), self.config.grad_accumulation
        shard = list(range(dist.rank(), len(idx), dist.size()))
        per_micro = -(-len(shard) // micro)
        parts = [shard[m * per_micro : (m + 1) * per_micro] for m in range(micro)]
        return [([idx[p] for p in part], [examples[p] for p in part]) for part in parts if part]

    def batches(self, step: int, examples: list[Example]):
        """(tokens, mask, targets) of each micro-batch of the step, in order."""
        plan = self.plan(step, examples)
        for m, (micro, part) in enumerate(plan):
            if not self.prefetch:
                tokens, mask = pad_batch(part, multiple=self.pad_multiple)
                yield tokens, mask, self.targets_fn(micro, "train", tokens)
                continue
            if (step, m) not in self.launched:  # the first micro-batch of a run
                self._launch(step, m, micro, part)
            current = self.launched.pop((step, m))
            if m + 1 < len(plan):
                self._launch(step, m + 1, *plan[m + 1])
            elif step + 1 < self.config.iters:
                self._launch(step + 1, 0, *self.plan(step + 1, self.examples(step + 1))[0])
            yield current

    def _order(self, step: int) -> list[int]:
        return batch_order(len(self.train), self.global_batch, self.config.seed, step)

    def _launch(self, step: int, m: int, micro: list[int], examples: list[Example]) -> None:
        tokens, mask = pad_batch(examples, multiple=self.pad_multiple)
        with mx.stream(self.stream):
            self.launched[(step, m)] = tokens, mask, self.targets_fn(micro, "train", tokens)


def micro_batch_steps(model, loss_and_grad, batches, layout: FlatLayout) -> tuple[mx.array, dict]:
    """The gradient (one float32 vector: `layout`, the trainable parameters') and loss sums of a step's
    micro-batches, token-weighted, summed across processes; queued on the device, not waited for. Sums
    (scalar arrays): loss, kd, ce, ul and n (tokens)."""
    grads_sum, sums = None, None
    for tokens, mask, targets in batches:
        (_, out), grads = loss_and_grad(model, tokens, mask, targets)
        n = out["ntokens"]
        grads = layout.flatten(grads) * n  # token-weighted: the step's gradient is that of the mean over its tokens
        grads_sum = grads if grads_sum is None else grads_sum + grads
        # across tokenizers there is no "ul"
        part = {k: out[k].astype(mx.float32) * n if k in out else mx.array(0.0) for k in ("loss", "kd", "ce", "ul")}
        part["n"] = n.astype(mx.float32)
        sums = part if sums is None else {k: sums[k] + part[k] for k in sums}
        mx.async_eval(grads_sum, sums)  # one micro-batch's graph at a time
    return dist.all_sum_tree(grads_sum), dist.all_sum_tree(sums)


@dataclass
class QueuedStep:
    """A step whose work is queued: its number (1-based), its lazy sums and gradient norm, and when the
    previous step was done with, its report, validation and saving included (or when the loop started).
    A step's time runs from then to the moment its figures are ready."""

    step: int
    sums: dict
    grad_norm: mx.array
    started: float


def finish_step(queued: QueuedStep, model, optimizer, val, targets_fn, config: KDConfig, vocab, out_dir: Path,
                adapter_cfg: dict, run: RunState, report) -> float:
    """Waits for a queued step's figures; raises on a non-finite loss (its update was skipped) or a batch
    without response tokens; reports the step, then validates and saves when due. Returns when it was done."""
    sums = {k: v.item() for k, v in queued.sums.items()}
    if sums["n"] == 0:
        raise ValueError("a batch has no response tokens to learn from (empty responses?)")
    loss_value = sums["loss"] / sums["n"]
    if not math.isfinite(loss_value):
        raise TrainingDivergedError(queued.step, run.last_checkpoint, loss_value)
    fault_point("step")
    dt = time.perf_counter() - queued.started
    run.step, run.tokens, run.train_seconds = queued.step, run.tokens + int(sums["n"]), run.train_seconds + dt
    event = Step(step=run.step, iters=config.iters, loss=loss_value, kd=sums["kd"] / sums["n"],
                 ce=sums["ce"] / sums["n"], ul=sums["ul"] / sums["n"], lr=optimizer.learning_rate.item(),
                 grad_norm=queued.grad_norm.item(), tokens_per_second=sums["n"] / dt,
                 peak_memory_gb=mx.get_peak_memory() / 1e9, tokens=run.tokens)
    run.last, run.best["train_loss"] = asdict(event), min(run.best["train_loss"], loss_value)
    report(event)
    if val and (run.step % config.val_interval == 0 or run.step == config.iters):
        run.last.update(validate(model, val, targets_fn, config, vocab, run, report, step=run.step))
    save(model, optimizer, out_dir, config, adapter_cfg, run, report)
    return time.perf_counter()


# The key of the optimizer's state that holds its per-parameter entries (AdamW's m and v) as one vector each
# while training (`flat_optimizer_state`); checkpoints keep them per parameter (`per_parameter_state`).
FLAT = "flat_trainable_parameters"


def flat_optimizer_state(state: dict, layout: FlatLayout) -> dict:
    """`state` (an mlx optimizer's, per parameter) with each per-parameter entry gathered into one vector in
    `layout`'s order under FLAT; the rest (step, learning rate) as it was. As is if already flat."""
    if FLAT in state or not layout.keys:
        return state
    entries = dict(tree_flatten(state))
    first = layout.keys[0] + "."
    names = sorted(k[len(first):] for k in entries if k.startswith(first))
    flat = {}
    for name in names:
        named = FlatLayout(tuple(f"{k}.{name}" for k in layout.keys), layout.shapes, layout.dtypes)
        flat[name] = named.flatten({k: entries.pop(k) for k in named.keys})
    return {**tree_unflatten(list(entries.items())), FLAT: flat}


def per_parameter_state(state: dict, layout: FlatLayout) -> dict:
    """The inverse of `flat_optimizer_state`: the optimizer's state as mlx keeps it, per parameter."""
    if FLAT not in state:
        return state
    entries = dict(tree_flatten({k: v for k, v in state.items() if k != FLAT}))
    for name, vector in state[FLAT].items():
        entries.update((f"{k}.{name}", v) for k, v in tree_flatten(layout.unflatten(vector)))
    return tree_unflatten(list(entries.items()))


def make_update(model: nn.Module, optimizer: optim.Optimizer, max_grad_norm: float, compiled: bool) -> Callable:
    """update(grads_sum, loss_sum, n): the step's mean gradient (grads_sum / n, the flat gradient of
    `micro_batch_steps`), clipped to `max_grad_norm`, applied by the optimizer, unless `loss_sum` is not finite
    or `n` is 0: then parameters and optimizer state stay as they were (decided on the device, so the loop
    need not wait for the loss before it queues the update). Returns the gradient norm before clipping.

    The parameters and the optimizer's per-parameter state are updated as one vector each (`flat`: 12 kernels
    a step instead of ~1,900 for 192 LoRA matrices); the model's parameters are views of the vector. Compiled on
    GPUs. Build it after a resume has replaced `optimizer.state` and the adapter: it takes both as they are
    then (the optimizer's state becomes flat, `flat_optimizer_state`)."""
    layout = FlatLayout.of(model.trainable_parameters())
    optimizer.state = flat_optimizer_state(optimizer.state, layout)
    held = {"params": layout.flatten(model.trainable_parameters())}

    def step(grads_sum, loss_sum, n):
        apply = mx.isfinite(loss_sum) & (n > 0)
        grads = grads_sum * (1.0 / n)
        norm = mx.sqrt(grads.square().sum())
        if max_grad_norm > 0:  # as mlx's optim.clip_grad_norm
            grads = grads * mx.minimum(max_grad_norm / (norm + 1e-6), 1.0)
        params, state = held["params"], tree_map(lambda x: x, optimizer.state)
        new = optimizer.apply_gradients({FLAT: grads}, {FLAT: params})[FLAT]
        held["params"] = mx.where(apply, new, params)
        _keep_unless(apply, optimizer.state, state)
        return norm

    if compiled:
        captured = [held, optimizer.state]
        step = mx.compile(step, inputs=captured, outputs=captured)

    def update(grads_sum, loss_sum, n):
        norm = step(grads_sum, loss_sum, n)
        model.update(layout.unflatten(held["params"]))
        return norm

    return update


def _keep_unless(apply: mx.array, tree, before) -> None:
    """In place (a compiled update keeps the optimizer's state objects): each array of `tree` becomes
    its new value where `apply`, the one in `before` otherwise. Entries the update added (an optimizer
    initialising its state after a resume) are kept."""
    for k in (tree if isinstance(tree, dict) else range(len(tree))):
        if isinstance(tree, dict) and k not in before:
            continue
        if isinstance(tree[k], (dict, list)):
            _keep_unless(apply, tree[k], before[k])
        elif isinstance(tree[k], mx.array):
            tree[k] = mx.where(apply, tree[k], before[k])


__all__ = [
    "TrainingCancelled", "TrainingDivergedError", "adapter_config", "apply_lora", "build_optimizer",
    "checkpoint_dirs", "evaluate", "save_adapter", "top1_agreement", "train_with_kd",
]
