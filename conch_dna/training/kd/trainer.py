"""The KD training loop for LoRA students, in the style of mlx-lm's tuner: plain functions, no Trainer class.

`train_with_kd(model, data, config, out_dir)` runs AdamW on the LoRA parameters with the
combined objective from `losses.kd_objective`, validates every `val_interval` steps, checkpoints every
`checkpoint_interval` steps and at the end, and resumes exactly from the latest checkpoint.

Exact resume needs no saved data cursor or RNG state: batch `s` is a function of (seed, s) (see
`data.batch_order`) and the random state (LoRA dropout) is reseeded from (seed, s) at every step. A
checkpoint therefore holds the adapter, the optimizer state and the step; it is written to a temporary
folder and renamed, so a crash leaves either the previous checkpoint or the new one, never half of one."""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import structlog

from conch_dna._faults import fault_point
from conch_dna.neuron import add_lora_layers
from conch_dna.training.kd import distributed as dist
from conch_dna.training.kd import kernels
from conch_dna.training.kd.checkpoints import (
    CheckpointError,
    checkpoint_dirs,
    load_checkpoint,
    save_checkpoint,
)
from conch_dna.training.kd.config import KDConfig
from conch_dna.training.kd.cross_vocab import CrossTargets, cross_objective
from conch_dna.training.kd.examples import Example, batch_order, pad_batch
from conch_dna.training.kd.flat import FlatLayout
from conch_dna.training.kd.fused import Chunking, TeacherStates, fused_objective, parts_match
from conch_dna.training.kd.lean import checkpoint_blocks, checkpoint_setting, lean_backward, use_lean_backward
from conch_dna.training.kd.losses import LossSpec, SparseTargets, kd_objective
from conch_dna.training.kd.report import Checkpoint, Event, Reporter, Step, Validation, quiet
from conch_dna.training.kd.targets import TargetsFn
from conch_dna.training.kd.update import build_optimizer, make_update
from conch_dna.training.kd.validation import dense_targets, evaluate, student_logits

log = structlog.get_logger(__name__)



class TrainingDivergedError(RuntimeError):
    """The loss became NaN/inf; training stopped and the last good checkpoint was kept."""

    def __init__(self, step: int, last_checkpoint: Path | None, value: float):
        self.step, self.last_checkpoint, self.value = step, last_checkpoint, value
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        super().__init__(
            f"loss became {value} at step {step}; training stopped, {where}. "
            "Lower the learning rate, raise max_grad_norm clipping, or check the teacher's outputs."
        )


class TrainingCancelled(RuntimeError):
    """`should_stop()` returned true; the run stopped at a step boundary."""


def apply_lora(model: nn.Module, config: KDConfig) -> int:
    """Freeze the model and add LoRA layers (mlx-lm's, computing in the model's dtype); returns the number
    of adapted blocks."""
    n_blocks = len(model.layers)
    num_layers = n_blocks if config.lora.num_layers in (-1, 0) else min(config.lora.num_layers, n_blocks)
    block_modules = {name for name, _ in model.layers[0].named_modules()}
    missing = [k for k in config.lora.keys if k not in block_modules]
    if missing:
        raise ValueError(f"LoRA keys {missing} are not modules of this model's blocks; available: {sorted(k for k in block_modules if k)}")
    model.freeze()
    add_lora_layers(model, num_layers, config.lora_parameters())
    return num_layers


def _seed_for(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**31)


def make_objective(config: KDConfig, logits_width: int | None, fused: bool, compiled: bool) -> Callable:
    """objective(model, tokens, loss_mask, targets) -> (loss, parts): the loss for whatever targets a batch
    has: across tokenizers the aligned-position loss, else the fused loss from hidden states (`fused`), else
    the reference loss on full logits cut to `logits_width`."""
    spec = LossSpec.of(config)
    chunking = Chunking(config.loss_chunk_size, compiled=compiled)

    def objective(model, tokens, loss_mask, targets):
        if isinstance(targets, CrossTargets):  # different tokenizers: aligned positions, mapped vocabularies
            out = cross_objective(model(tokens), targets, tokens, loss_mask, spec)
        elif fused and not isinstance(targets, mx.array):
            out = fused_objective(model, targets, tokens, loss_mask, spec, chunking, logits_width)
        else:
            out = kd_objective(student_logits(model, tokens, logits_width), dense_targets(targets, logits_width), tokens, loss_mask, spec)
        return out["loss"], out

    return objective


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


@dataclass(frozen=True)
class TrainingData:
    """What a run learns from: the training and validation examples, the teacher's targets for a batch of
    them (`targets.TargetsFn`), and the width student logits are cut to (a padded vocabulary's real one)."""

    train: list[Example]
    val: list[Example]
    targets_fn: TargetsFn
    logits_width: int | None = None


@dataclass(frozen=True)
class Hooks:
    """How a run talks to its caller: `reporter` gets the typed events (`report.Step`, `Validation`,
    `Checkpoint`; default: metrics.jsonl and the log), `should_stop()` asks for a clean stop,
    `student_writes(examples)` has the current student answer prompts (on-policy KD)."""

    reporter: Callable[[Event], None] | None = None
    should_stop: Callable[[], bool] | None = None
    student_writes: Callable[[list[Example]], list[Example]] | None = None


NO_HOOKS = Hooks()


@dataclass
class Run:
    """One training run: what its stages share (model, optimizer, settings, data, output folder, reporter) and
    what it carries from step to step and restores from a checkpoint (the step reached, the best losses,
    the tokens seen, the last step's figures, the newest checkpoint)."""

    model: nn.Module
    optimizer: optim.Optimizer
    config: KDConfig
    data: TrainingData
    out_dir: Path
    adapter_cfg: dict
    report: Callable[[Event], None]
    step: int = 0
    best: dict = field(default_factory=lambda: {"train_loss": math.inf, "val_loss": math.inf, "val_kd": math.inf,
                                                "val_ce": math.inf})
    tokens: int = 0
    last: dict = field(default_factory=dict)
    last_checkpoint: Path | None = None
    train_seconds: float = 0.0


def train_with_kd(model: nn.Module, data: TrainingData, config: KDConfig, out_dir: Path, *, adapter_cfg: dict,
                  resume: bool = False, hooks: Hooks = NO_HOOKS) -> dict:
    """Train the (already LoRA-wrapped) `model`; returns a summary of losses, tokens and time.

    Stages, top to bottom: build the step, start or resume, validate the untrained student, then per step:
    queue its batch's micro-batches (teacher targets, gradients, reduced across processes), finish the step
    before (wait for its figures, report, validate and save), queue the update. Raises
    `TrainingDivergedError` on a non-finite loss and `TrainingCancelled` when `hooks.should_stop()` is true
    (after saving a checkpoint at the step reached).
    """
    _check_batch(data.train, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = (hooks.reporter or Reporter(out_dir / "metrics.jsonl", log_every=config.iters // 10)) if dist.is_writer() else quiet
    with memory_limit(config.memory_limit_gb):
        loss_and_grad, pad_multiple = build_step(model, config, data.logits_width)
        optimizer = build_optimizer(config)
        optimizer.init(model.trainable_parameters())
        run = Run(model, optimizer, config, data, out_dir, adapter_cfg, report)
        start_or_resume(run, resume)
        if run.step == 0 and data.val:
            validate(run, step=0)
        update = make_update(model, optimizer, config.max_grad_norm, use_compile(config))  # after a resume: see there
        pipeline = TargetsPipeline(data.train, data.targets_fn, config, pad_multiple)
        layout = FlatLayout.of(model.trainable_parameters())  # how each step's gradient is gathered (`make_update`)
        start_step, t_start = run.step, time.perf_counter()
        # The host reads a step's figures only after it has queued the next step's micro-batches: while it
        # waits, reports, validates and saves, the GPU already works on that step. The update is guarded on
        # the GPU (`make_update`), so a diverged step changes nothing before it is reported.
        pending, done_at = None, t_start
        for step in range(run.step, config.iters):
            mx.random.seed(_seed_for(config.seed, step))
            examples = pipeline.examples(step)
            if config.on_policy_lambda > 0 and hooks.student_writes is not None:
                examples = on_policy(model, examples, config, step, hooks.student_writes)
            grads_sum, sums = micro_batch_steps(model, loss_and_grad, pipeline.batches(step, examples), layout)
            if pending is not None:
                done_at = finish_step(run, pending)
            if hooks.should_stop is not None and hooks.should_stop():
                save(run, force=True)
                raise TrainingCancelled(f"cancelled before step {step + 1}; resume from {run.last_checkpoint}")
            grad_norm = update(grads_sum, sums["loss"], sums["n"])
            mx.async_eval(grad_norm, model.trainable_parameters(), optimizer.state)
            pending = QueuedStep(step + 1, sums, grad_norm, started=done_at)
        if pending is not None:
            finish_step(run, pending)
    return {"final": run.last, "best": run.best, "tokens": run.tokens, "train_seconds": run.train_seconds,
            "wall_seconds": time.perf_counter() - t_start, "start_step": start_step,
            "last_checkpoint": str(run.last_checkpoint) if run.last_checkpoint else None}


def _check_batch(train: list[Example], config: KDConfig) -> None:
    global_batch = config.batch_size * config.grad_accumulation
    if not train:
        raise ValueError("no training examples: give more prompts or lower val_fraction")
    if global_batch < dist.size():
        raise ValueError(f"batch_size x grad_accumulation = {global_batch} is smaller than the {dist.size()} processes; "
                         "every process needs at least one example per step")


def build_step(model: nn.Module, config: KDConfig, logits_width: int | None) -> tuple[Callable, int]:
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
    loss_and_grad = nn.value_and_grad(model, make_objective(config, logits_width, fused, compiled))
    if compiled:
        loss_and_grad = compile_loss_and_grad(model, loss_and_grad)
    if dist.is_writer():
        log.info("training", steps=config.iters, fused_loss=fused, compiled=compiled, teacher_prefetch=use_prefetch(config),
                 grad_checkpoint=checkpoint_setting(config), memory_limit_gb=config.memory_limit_gb)
        if compiled and kernels.on_cuda():  # 207 s before the first 146 steps of a healing run (docs/benchmarks.md)
            log.info("kernels compile first", advice="the first steps compile MLX's CUDA kernels (minutes on a machine "
                     "that has not run them; MLX keeps them on disk); for a short run set compile_step = 'off' with "
                     "MLX_USE_CUDA_GRAPHS=0 in the environment")
    return loss_and_grad, 32 if compiled else 1


def start_or_resume(run: Run, resume: bool) -> None:
    """A fresh run, or the latest checkpoint's state (adapter and optimizer loaded into the run's model and
    optimizer)."""
    out_dir = run.out_dir
    if dist.is_writer():
        # left by a crash while saving, or while removing an old checkpoint
        for stale in [*out_dir.glob(".checkpoint_*.tmp-*"), *out_dir.glob(".checkpoint_*.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
    ckpts = checkpoint_dirs(out_dir)
    run.last_checkpoint = ckpts[-1] if ckpts else None
    if resume and ckpts:
        state = load_checkpoint(run.model, run.optimizer, ckpts[-1], run.adapter_cfg)
        if state["step"] > run.config.iters:
            raise CheckpointError(f"the checkpoint in {out_dir} is at step {state['step']}, past iters={run.config.iters}; "
                                  "raise --iters, or start afresh without --resume")
        run.step, run.tokens, run.last = state["step"], state.get("tokens", 0), state.get("last", {})
        run.best = state.get("best", run.best)
        log.info("resumed", checkpoint=str(ckpts[-1]), step=run.step)
    if isinstance(run.report, Reporter):
        run.report.resumed(run.step)


def validate(run: Run, step: int) -> dict:
    """Validation figures at `step`; step 0 (the untrained student) is the baseline, later ones count for
    the best losses."""
    data = run.data
    figures = evaluate(run.model, data.val, data.targets_fn, run.config, run.config.batch_size, data.logits_width)
    if step == 0:
        run.best["initial_val_kd"], run.best["initial_val_loss"] = figures["val_kd"], figures["val_loss"]
    else:
        for k in ("val_loss", "val_kd", "val_ce"):
            run.best[k] = min(run.best[k], figures[k])
    run.report(Validation(step, figures))
    return figures


def save(run: Run, force: bool = False) -> None:
    """A checkpoint every `checkpoint_interval` steps, at the end, and (`force`) when stopping early; rank 0
    writes it, every process waits for it."""
    config = run.config
    due = run.step % config.checkpoint_interval == 0 or run.step == config.iters
    done = run.last_checkpoint is not None and run.last_checkpoint.name == f"checkpoint_{run.step:06d}"
    if not (due or force) or done or run.step == 0:
        return
    if dist.is_writer():
        run.last_checkpoint = save_checkpoint(run.model, run.optimizer, run.out_dir, run.step,
                                              {"best": run.best, "tokens": run.tokens, "last": run.last},
                                              run.adapter_cfg, config.keep_checkpoints)
        run.report(Checkpoint(run.step, str(run.last_checkpoint)))
    dist.barrier()


def on_policy(model, examples: list[Example], config: KDConfig, step: int, student_writes) -> list[Example]:
    """The on-policy share of a step's batch: the current student answers these prompts, and the teacher
    scores its tokens. Corpus windows (no prompt) stay as they are. Each process writes the answers of its own
    shard only."""
    pick = np.random.default_rng([config.seed, step, 7]).random(len(examples)) < config.on_policy_lambda
    pick &= np.array([e.prompt_len > 0 for e in examples])
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


def finish_step(run: Run, queued: QueuedStep) -> float:
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
    event = Step(step=run.step, iters=run.config.iters, loss=loss_value, kd=sums["kd"] / sums["n"],
                 ce=sums["ce"] / sums["n"], ul=sums["ul"] / sums["n"], lr=run.optimizer.learning_rate.item(),
                 grad_norm=queued.grad_norm.item(), tokens_per_second=sums["n"] / dt,
                 peak_memory_gb=mx.get_peak_memory() / 1e9, tokens=run.tokens)
    run.last, run.best["train_loss"] = asdict(event), min(run.best["train_loss"], loss_value)
    run.report(event)
    if run.data.val and (run.step % run.config.val_interval == 0 or run.step == run.config.iters):
        run.last.update(validate(run, step=run.step))
    save(run)
    return time.perf_counter()
