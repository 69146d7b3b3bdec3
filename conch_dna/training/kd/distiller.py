"""TrueKnowledgeDistiller: teacher data -> KD training of a LoRA student -> adapter, per domain.

    distiller = TrueKnowledgeDistiller(teacher_model_id=..., student_model_id=..., config=KDConfig(...))
    result = distiller.distill_domain("thinking", prompts)   # -> KDResult
    results = distiller.distill_all()                        # every domain; writes kd_summary.json

The teacher can be handed in already loaded (EGO's live model and tokenizer): nothing is reloaded.
Per domain the output folder holds adapters.safetensors + adapter_config.json (mlx-lm's format),
checkpoint_*/, metrics.jsonl and result.json.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import mlx.core as mx
import structlog
from pydantic import BaseModel

from conch_dna.atomic import atomic_write, check_writable
from conch_dna.models import load_model
from conch_dna.neuron import DataError, check_name, eos_id
from conch_dna.training.kd import distributed as dist
from conch_dna.training.kd import signals
from conch_dna.training.kd.checkpoints import adapter_config, check_resumable, checkpoint_dirs, save_adapter
from conch_dna.training.kd.config import ConfigError, KDConfig
from conch_dna.training.kd.cross_examples import cross_examples
from conch_dna.training.kd.cross_vocab import (
    CrossTokenizerError,
    build_vocab_map,
    compare_tokenizers,
    vmap_arrays,
)
from conch_dna.training.kd.domains import load_domains, load_held_out
from conch_dna.training.kd.evaluate import (
    Judging,
    answer,
    answer_figures,
    decoded_responses,
    generation_metrics,
    repeated_ngram_share,
    responses,
)
from conch_dna.training.kd.examples import (
    Example,
    continue_prompts,
    split_examples,
)
from conch_dna.training.kd.lora_init import CALIBRATION_EXAMPLES, matching_layers, residual_start
from conch_dna.training.kd.memory import param_bytes, preflight, queue_advice, settings_for_budget
from conch_dna.training.kd.report import Reporter
from conch_dna.training.kd.targets import cross_targets, teacher_targets
from conch_dna.training.kd.teacher_cache import (
    TeacherCache,
    cache_key,
    fingerprint_model,
)
from conch_dna.training.kd.teacher_data import Teacher, teacher_data
from conch_dna.training.kd.trainer import (
    Hooks,
    TrainingCancelled,
    TrainingData,
    TrainingDivergedError,
    apply_lora,
    train_with_kd,
    use_prefetch,
)
from conch_dna.training.kd.vocab import tokenizer_vocab_size

log = structlog.get_logger(__name__)


# config.json fields that make two models' layers the same shapes (lora.init = "residual")
SHAPE_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


class OutputDirError(OSError):
    """The output directory cannot be created or written, or another process is writing it."""


@contextmanager
def output_lock(folder: Path):
    """Exclusive, non-blocking lock on a domain's output folder, held for the whole run.

    Two processes (or two EGOs) writing one folder would interleave checkpoints and adapters; the second
    gets a clear error instead. The lock is released by the OS if the holder dies, even by SIGKILL.
    """
    import fcntl

    if not dist.is_writer():  # data-parallel helpers write nothing; rank 0 holds the lock
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise OutputDirError(f"{folder} is being written by another process ({holder}); wait for it to finish "
                                 "or choose another --output") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class KDResult(BaseModel):
    """What one domain's distillation produced; JSON-serialisable (`model_dump_json`)."""

    domain: str
    run_id: str
    teacher_model_id: str
    student_model_id: str
    num_train_samples: int  # including the student's own answers, of which there are num_own_answers
    num_val_samples: int
    num_own_answers: int = 0
    final_train_kd: float
    final_train_ce: float
    final_train_loss: float
    best_train_loss: float
    final_val_kd: float | None = None
    final_val_ce: float | None = None
    final_val_loss: float | None = None
    best_val_kd: float | None = None
    best_val_ce: float | None = None
    best_val_loss: float | None = None
    val_agreement: float | None = None
    initial_val_kd: float | None = None
    # How the adapter started (lora.init): layers set from the teacher's residual, calibration tokens, seconds
    lora_start: dict | None = None
    # The neuron judged on held-out prompts (`evaluate.generation_metrics`, beside the teacher's own figures)
    held_out: dict | None = None
    # What serving it costs beside the teacher: weight bytes (see `TrueKnowledgeDistiller.cost`)
    cost: dict | None = None
    # Set when teacher and student tokenizers differ: vocabulary mapping, alignment and coverage figures.
    cross_tokenizer: dict | None = None
    adapter_path: str
    iterations: int
    tokens_processed: int
    training_seconds: float
    generation: dict
    config: dict
    timestamp: str


def registry_metrics(result: KDResult) -> dict:
    """The figures a registered version carries (the CORTEX quality gate reads them): validation losses and
    the held-out judgement, flattened as `held_out_<figure>`, and the cost."""
    held = {f"held_out_{k}": v for k, v in (result.held_out or {}).items() if isinstance(v, int | float)}
    share = (result.cost or {}).get("share_of_teacher_bf16")
    return {"val_kd": result.final_val_kd, "val_ce": result.final_val_ce, "val_agreement": result.val_agreement,
            "initial_val_kd": result.initial_val_kd, **held, "share_of_teacher_bf16": share}


def register_result(registry, name: str, result: KDResult):
    """Register a trained adapter as the next version of neuron `name` in a CORTEX `NeuronRegistry`, with the
    figures its quality gate reads; the same adapter registered again returns its version (a resumed run
    killed after registering is idempotent). Returns (version, whether it is active)."""
    v = registry.register(name, result.adapter_path, teacher=result.teacher_model_id, student=result.student_model_id,
                          exist_ok=True, metrics=registry_metrics(result))
    active = registry.active(name)
    return v, active is not None and active.version == v.version


def _finite_or_none(x):
    return None if x is None or x != x or x in (float("inf"), float("-inf")) else float(x)


def _check_writable(folder: Path) -> None:
    if not dist.is_writer():  # only rank 0 of a data-parallel run writes
        return
    try:
        check_writable(folder)
    except OSError as e:
        raise OutputDirError(f"output directory {folder} is not writable ({e.strerror}); choose another with --output") from e


@dataclass
class DomainJob:
    """One domain's distillation as its stages share it: what the caller asked (domain, data fingerprint,
    resume, stop, held-out prompts), where it goes, the settings as the run settles them, and the student's
    data as the stages build it."""

    domain: str
    report: Reporter
    data: str  # fingerprint of the prompts and answers trained on (a resume must see the same)
    resume: bool
    should_stop: Callable[[], bool] | None
    held_out: list[str]
    generation_stats: dict
    out_dir: Path
    config: KDConfig
    cross: dict | None = None  # across tokenizers: the vocabulary map and coverage figures
    logits_width: int | None = None  # the width student logits are cut to
    train: list = field(default_factory=list)
    val: list = field(default_factory=list)
    train_idx: list[int] = field(default_factory=list)
    val_idx: list[int] = field(default_factory=list)
    own: list = field(default_factory=list)  # the student's own answers to its training prompts
    longest: int = 0
    lora_start: dict | None = None

    @property
    def run_id(self) -> str:
        return self.report.context["run_id"]


def explained_device_error(e: RuntimeError) -> RuntimeError | None:
    """`e` with what to do, where MLX's message alone does not say (else None): on CUDA the eager step's CUDA
    graphs ran out of memory at batches of 16 x 512 on one H100 (docs/benchmarks.md, "Corpus KD heals the
    pruned student")."""
    if "cudaGraphInstantiate" in str(e) and "out of memory" in str(e):
        return RuntimeError(f"{e}: MLX's CUDA graphs ran out of memory; run with MLX_USE_CUDA_GRAPHS=0 in the "
                            "environment (or compile_step = 'on'), or lower batch_size / max_seq_length")
    return None


class TrueKnowledgeDistiller:
    """Distils a teacher (EGO) into per-domain LoRA adapters on a student (a CORTEX neuron's base)."""

    def __init__(
        self,
        teacher_model_id: str | None = None,
        student_model_id: str | None = None,
        config: KDConfig | None = None,
        *,
        teacher=None,
        teacher_tokenizer=None,
        teacher_lock: threading.Lock | threading.RLock | None = None,
    ):
        config = config or KDConfig.load()
        updates = {k: v for k, v in (("teacher_model_id", teacher_model_id), ("student_model_id", student_model_id)) if v}
        self.config = config.updated(**updates) if updates else config
        if (teacher is None) != (teacher_tokenizer is None):
            raise ValueError("pass both teacher and teacher_tokenizer (a live model), or neither")
        self._teacher, self._teacher_tokenizer = teacher, teacher_tokenizer
        self._teacher_fingerprint: str | None = None
        # A live teacher may be shared with other threads (EGO answering prompts): hold this lock around it.
        self.teacher_lock = teacher_lock or threading.Lock()

    # ------------------------------------------------------------------------------------- models

    @property
    def teacher(self):
        """The teacher model: the live one passed in, or `teacher_model_id` loaded on first use."""
        if self._teacher is None:
            self._teacher, self._teacher_tokenizer = load_model(self.config.teacher_model_id)
        return self._teacher

    @property
    def teacher_tokenizer(self):
        """The teacher's tokenizer."""
        _ = self.teacher
        return self._teacher_tokenizer

    @property
    def teacher_fingerprint(self) -> str:
        """The teacher's content fingerprint (`fingerprint_model`), computed once: the teacher is frozen while it
        teaches, and the fingerprint keys its cached answers and marks what a checkpoint was trained on."""
        if self._teacher_fingerprint is None:
            with self.teacher_lock:
                self._teacher_fingerprint = fingerprint_model(self.teacher)
        return self._teacher_fingerprint

    def check_models(self) -> None:
        """Refuse, before any work, model folders that cannot work (`check_model_folder`) and a
        max_seq_length longer than the teacher's or the student's context."""
        from conch_dna.models import check_model_folder, context_length

        cfg = self.config
        check_model_folder(cfg.student_model_id)
        if self._teacher is None:
            check_model_folder(cfg.teacher_model_id)
        if cfg.lora.init == "residual":
            self._check_same_shape()
        for role, model_id in (("student", cfg.student_model_id), ("teacher", cfg.teacher_model_id)):
            if (context := context_length(model_id)) is not None and cfg.max_seq_length > context:
                raise DataError(f"max_seq_length={cfg.max_seq_length} is longer than the {role}'s context ({context} "
                                f"tokens, max_position_embeddings of {model_id}); lower --max-seq-length to at most {context}")

    def _check_same_shape(self) -> None:
        """lora.init = "residual" needs a student of the teacher's shape: compare their config.json (or the live
        teacher's arguments) before any work; the layer-by-layer check follows when both are loaded."""
        from conch_dna.models import model_path

        def shape(model_id, live=None):
            if live is not None and hasattr(live, "args"):
                cfg = vars(live.args)
            elif (folder := model_path(model_id)) is not None and (folder / "config.json").is_file():
                cfg = json.loads((folder / "config.json").read_text())
            else:
                return None
            return {k: cfg.get(k) for k in SHAPE_KEYS}

        s, t = shape(self.config.student_model_id), shape(self.config.teacher_model_id, self._teacher)
        if s is not None and t is not None and s != t:
            diff = ", ".join(f"{k} {s[k]} (student) vs {t[k]} (teacher)" for k in SHAPE_KEYS if s[k] != t[k])
            raise ConfigError(f"lora.init = 'residual' needs a student of the teacher's shape (e.g. its quantized copy): "
                              f"{diff}; use --lora-init zero or auto")

    def _start_lora(self, student, train, out_dir: Path, resume: bool) -> dict | None:
        """`lora.init`: start the adapter from the teacher's residual (lora_init.py), calibrated on the first
        training examples. None for a zero start; {"skipped": why} when the student is no same-shaped copy
        ("auto"); {"from_checkpoint": True} when a checkpoint will replace the weights anyway."""
        init = self.config.lora.init
        if init == "zero":
            return None
        with self.teacher_lock:
            why = matching_layers(student, self.teacher)[1]
        if why is not None:
            if init == "residual":
                raise ConfigError(f"lora.init = 'residual' needs a student that differs from the teacher only in its "
                                  f"weights: {why}; use --lora-init zero or auto")
            return {"skipped": why}
        if resume and checkpoint_dirs(out_dir):
            return {"from_checkpoint": True}
        calibration = [train[i] for i in range(min(len(train), CALIBRATION_EXAMPLES))]
        t0 = time.perf_counter()
        with self.teacher_lock:
            start = residual_start(student, self.teacher, calibration)
        return {**start, "seconds": time.perf_counter() - t0}

    def _own_answers(self, student, tokenizer, train: list[Example], out_dir: Path, resume: bool) -> list[Example]:
        """`own_answers`: the student's greedy answers to the training prompts, written after the adapter's
        start (so they show where the student it trains loops), and kept in `out_dir` so that a resumed run
        trains on the same ones."""
        cfg = self.config
        path = out_dir / "own_answers.json"
        if resume and checkpoint_dirs(out_dir) and path.is_file():
            saved = json.loads(path.read_text())
            return [Example(tuple(d["tokens"]), d["prompt_len"], d["prompt"]) for d in saved]
        seen, asked = set(), []
        for e in train:  # each chat prompt once (corpus windows have no prompt to answer)
            key = e.tokens[: e.prompt_len]
            if e.prompt_len > 0 and key not in seen:
                seen.add(key)
                asked.append(e)
        t0 = time.perf_counter()
        student.eval()
        greedy = type(cfg.generation).model_validate({**cfg.generation.model_dump(), "temperature": 0.0, "top_p": 1.0})
        written = continue_prompts(student, tokenizer, asked, greedy, cfg.max_seq_length)
        student.train()
        own = [w for w, e in zip(written, asked) if w is not e]
        log.info("student answered its training prompts", answers=len(own), seconds=round(time.perf_counter() - t0, 1),
                 repetition=round(repeated_ngram_share(responses(own)), 4))
        if dist.is_writer():
            records = [{"tokens": list(e.tokens), "prompt_len": e.prompt_len, "prompt": e.prompt} for e in own]
            atomic_write(path, lambda p: p.write_text(json.dumps(records)))
        return own

    def load_student(self):
        """A fresh copy of the student model and its tokenizer (`student_model_id`)."""
        return load_model(self.config.student_model_id)

    # --------------------------------------------------------------------------------- teacher data

    def generate_training_data(self, prompts: list[str], domain: str, report: Reporter | None = None,
                               should_stop: Callable[[], bool] | None = None,
                               answered: list[tuple[str, list[int]]] | None = None) -> tuple[TeacherCache, dict]:
        """Teacher responses and top-k soft targets for `prompts`, from the cache when inputs are unchanged
        (`teacher_data.teacher_data`). `answered`: (prompt, answer token ids) the teacher already wrote (EGO's
        experience), used as they are. `report` gets `teacher_progress` after each batch; `should_stop()`
        cancels between batches."""

        def on_batch(done: int) -> None:
            if report is not None:
                report.signal(signals.teacher_progress, done=done, total=len(prompts))
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"cancelled during teacher generation ({done} of {len(prompts)} prompts "
                                        "answered); nothing was cached, a new run starts it again")

        teacher = Teacher(self.teacher, self.teacher_tokenizer, self.teacher_lock, self.teacher_fingerprint)
        return teacher_data(teacher, self.config, prompts, domain, answered or [], on_batch)

    # ------------------------------------------------------------------------------------ training

    def distill_domain(self, domain: str, prompts: list[str] | None = None, *, resume: bool = False,
                       should_stop: Callable[[], bool] | None = None, held_out: list[str] | None = None,
                       answered: list[tuple[str, list[int]]] | None = None) -> KDResult:
        """Generate teacher data for `domain`, train its LoRA adapter with KD, save it, judge it on the
        held-out prompts (the domain's `held_out` list unless given); return the result. `answered`: (prompt,
        answer token ids) pairs the teacher already wrote (EGO's experience), trained on beside `prompts`."""
        cfg = self.config
        check_name(domain)
        self.check_models()  # before the teacher writes anything
        domains = load_domains()
        if prompts is None and cfg.text_share < 1 and not answered:
            if domain not in domains:
                raise DataError(f"unknown domain {domain!r}: known domains are {', '.join(domains)}; "
                                "pass prompts (or --prompts FILE) for a custom domain")
            prompts = domains[domain]
        prompts = [p for p in (s.strip() for s in prompts or []) if p]
        if not prompts and not answered and (cfg.text is None or cfg.text_share < 1):
            raise DataError(f"domain {domain!r}: the prompt list is empty")
        if held_out is None:
            held_out = load_held_out(domain) if domain in domains else []
        out_dir = Path(cfg.output_dir) / domain
        _check_writable(out_dir)
        data = cache_key(prompts=prompts, answered=[(p, list(ids)) for p, ids in answered or []])
        if resume:  # a checkpoint this run cannot continue is refused before the teacher works
            check_resumable(out_dir, adapter_config(cfg, 0, self._run_record(domain, data)))
        run_id = uuid.uuid4().hex[:12]
        report = self._reporter(domain, run_id, out_dir)
        log.info("distillation started", domain=domain, run_id=run_id, prompts=len(prompts))
        if report.wants(signals.distillation_started):
            report.signal(signals.distillation_started, config=cfg.model_dump(mode="json"), prompts=len(prompts))
        with self._failure_signal(report, out_dir), output_lock(out_dir):
            if prompts or answered:
                cache, gen_stats = self.generate_training_data(prompts, domain, report, should_stop, answered)
            else:  # corpus only: nothing for the teacher to write
                cache, gen_stats = TeacherCache([], [], {}), {"samples": 0, "seconds": 0.0, "tokens": 0}
            report.signal(signals.teacher_data_ready, samples=len(cache.examples),
                          tokens=sum(len(e.tokens) for e in cache.examples), seconds=float(gen_stats.get("seconds", 0.0)),
                          cached=bool(gen_stats.get("cached", False)))
            job = DomainJob(domain, report, data, resume, should_stop, held_out, gen_stats, out_dir, cfg)
            return self._train(job, cache)

    def _run_record(self, domain: str, data: str) -> dict:
        """What this run trains on beyond its settings: the teacher's weights, the domain and the data."""
        return {"teacher_weights": self.teacher_fingerprint, "domain": domain, "data": data}

    def _train(self, job: DomainJob, cache: TeacherCache) -> KDResult:
        """The domain's stages after the teacher's answers: the student and its data, its settings, the
        teacher's targets, the training loop, then the adapter judged and recorded."""
        student, student_tok = self.load_student()
        self._student_data(job, cache, student, student_tok)
        num_layers = self._settle(job, student, student_tok)
        acfg = adapter_config(job.config, num_layers, {**self._run_record(job.domain, job.data), "run_id": job.run_id})
        targets_fn = self._targets_fn(job, cache)
        cfg, g = job.config, job.config.generation

        def student_writes(examples):
            return continue_prompts(student, student_tok, examples, g, cfg.max_seq_length)

        hooks = Hooks(job.report, job.should_stop, student_writes if cfg.on_policy_lambda > 0 else None)
        try:
            summary = train_with_kd(student, TrainingData(job.train, job.val, targets_fn, job.logits_width), cfg, job.out_dir,
                                    adapter_cfg=acfg, resume=job.resume, hooks=hooks)
        except RuntimeError as e:
            if (explained := explained_device_error(e)) is None:
                raise
            raise explained from e
        if dist.is_writer():
            save_adapter(student, job.out_dir, acfg)
        quality = None
        if job.held_out and cfg.eval_max_new_tokens > 0 and not job.cross and dist.is_writer():
            quality = self.judge(student, job.held_out, job.logits_width)
        return self._record_result(job, summary, quality)

    def _student_data(self, job: DomainJob, cache: TeacherCache, student, student_tok) -> None:
        """The examples the student learns from, split into training and validation, in its tokenization (with
        the teacher's aligned across tokenizers), and with the corpus's windows when there is one."""
        cfg, examples = job.config, cache.examples
        relation = compare_tokenizers(self.teacher_tokenizer, student_tok)
        if relation["relation"] == "different":
            examples, job.cross = self._cross_setup(cache, student, student_tok, relation)
        else:
            job.logits_width = self._shared_vocab(student, student_tok, relation)
        job.train_idx, job.val_idx = split_examples(list(range(len(examples))), cfg.val_fraction, cfg.seed)
        job.train = [examples[i] for i in job.train_idx]
        job.val = [examples[i] for i in job.val_idx]
        job.longest = max((len(e.tokens) for e in job.train + job.val), default=0)
        if cfg.text is not None:
            if job.cross:
                raise CrossTokenizerError("corpus KD (text) is not supported across tokenizers yet: the teacher "
                                          "would score another tokenization of each window; unset text")
            job.train, job.val = self._with_corpus(job.train, job.val, student_tok)
            job.longest = max(job.longest, cfg.max_seq_length)

    def _settle(self, job: DomainJob, student, student_tok) -> int:
        """The adapter added and started, the settings the run settles (learning rate, memory), the student's
        own answers added; returns the number of adapted blocks."""
        cfg = job.config
        # LoRA's A matrices are random: seed them, so that a run is reproducible whether or not this process
        # generated the teacher data (which also draws random numbers), and data-parallel ranks start equal.
        mx.random.seed(cfg.seed)
        num_layers = apply_lora(student, cfg)
        job.lora_start = self._start_lora(student, job.train, job.out_dir, job.resume)
        if cfg.learning_rate is None:  # settled by the start, and recorded so that a resumed run uses the same
            residual = bool(job.lora_start) and "skipped" not in job.lora_start
            cfg = cfg.updated(learning_rate=cfg.learning_rate_for(residual))
        if cfg.own_answers == "on" or (cfg.own_answers == "auto" and cfg.teacher_targets == "online" and not job.cross
                                       and cfg.text is None):
            job.own = self._own_answers(student, student_tok, job.train, job.out_dir, job.resume)
            job.train = job.train + job.own
            job.longest = max([job.longest] + [len(e.tokens) for e in job.own])
        job.config = self._fit_memory(cfg, student, job)
        return num_layers

    def _fit_memory(self, cfg: KDConfig, student, job: DomainJob) -> KDConfig:
        """The settings a memory budget chooses, and the preflight that refuses settings that cannot fit."""
        running_teacher = self.teacher if cfg.teacher_targets == "online" else None
        if cfg.memory_budget_gb is not None:
            update = settings_for_budget(student, running_teacher, cfg, job.longest, cfg.memory_budget_gb)
            log.info("memory budget", budget_gb=cfg.memory_budget_gb, **update)
            cfg = cfg.updated(**update)
        weights = param_bytes(student) + (param_bytes(running_teacher) if running_teacher is not None else 0)
        if (advice := queue_advice(cfg.memory_budget_gb or cfg.memory_limit_gb, weights)) is not None:
            log.warning("gpu queue unbounded", advice=advice)
        if cfg.memory_preflight:
            # Across tokenizers the student's full logits exist (the reference loss): estimate that.
            est = preflight(student, running_teacher, cfg.updated(loss_impl="reference") if job.cross else cfg,
                            cfg.batch_size, job.longest)
            log.info("memory preflight", estimate_gb=round(est["total"] / 2**30, 2), batch=cfg.batch_size, seq=job.longest)
        return cfg

    def _targets_fn(self, job: DomainJob, cache: TeacherCache):
        """The teacher's targets for the run's batches: across tokenizers, cached, or online."""
        cfg = job.config
        if job.cross:
            return cross_targets(self.teacher, cfg, job.train, job.val, job.cross["vmap"], lock=self.teacher_lock)
        fixed = None if cfg.text is not None else {"train": job.train, "val": job.val}  # a corpus streams
        return teacher_targets(self.teacher, cfg, (cache, job.train_idx, job.val_idx), job.logits_width,
                               lock=self.teacher_lock, prefetch=use_prefetch(cfg), examples=fixed)

    def _record_result(self, job: DomainJob, summary: dict, quality: dict | None) -> KDResult:
        """The domain's `KDResult`, written as result.json, logged and signalled (`domain_completed`)."""
        cfg, final, best = job.config, summary["final"], summary["best"]
        adapter = job.out_dir / "adapters.safetensors"
        cross = job.cross
        result = KDResult(
            domain=job.domain, run_id=job.run_id, teacher_model_id=cfg.teacher_model_id, student_model_id=cfg.student_model_id,
            num_train_samples=len(job.train), num_val_samples=len(job.val), num_own_answers=len(job.own),
            final_train_kd=final["kd"], final_train_ce=final["ce"], final_train_loss=final["loss"],
            best_train_loss=best["train_loss"],
            final_val_kd=final.get("val_kd"), final_val_ce=final.get("val_ce"), final_val_loss=final.get("val_loss"),
            best_val_kd=_finite_or_none(best.get("val_kd")), best_val_ce=_finite_or_none(best.get("val_ce")),
            best_val_loss=_finite_or_none(best.get("val_loss")), val_agreement=final.get("val_agreement"),
            initial_val_kd=_finite_or_none(best.get("initial_val_kd")), lora_start=job.lora_start,
            held_out=quality, cost=self.cost(adapter),
            cross_tokenizer={**cross["figures"], **{k: final[k] for k in ("val_coverage",) if k in final}} if cross else None,
            adapter_path=str(adapter.parent), iterations=cfg.iters, tokens_processed=summary["tokens"],
            training_seconds=summary["train_seconds"], generation=job.generation_stats, config=cfg.model_dump(mode="json"),
            timestamp=datetime.now(UTC).isoformat(),
        )
        if dist.is_writer():
            atomic_write(job.out_dir / "result.json", lambda p: p.write_text(result.model_dump_json(indent=2)))
        dist.barrier()
        log.info("domain completed", domain=job.domain, adapter=result.adapter_path, val_kd=result.final_val_kd,
                 val_agreement=result.val_agreement, seconds=round(result.training_seconds, 1),
                 **{f"held_out_{k}": round(v, 4) for k, v in (quality or {}).items() if isinstance(v, float)})
        if job.report.wants(signals.domain_completed):
            job.report.signal(signals.domain_completed, result=result.model_dump(mode="json"), adapter_path=result.adapter_path)
        return result

    def distill_all(self, domains: dict[str, list[str]] | None = None, *, resume: bool = False,
                    spread: bool = False, should_stop: Callable[[], bool] | None = None) -> dict[str, KDResult]:
        """Distil every domain (default: all of DOMAIN_PROMPTS) and write <output>/kd_summary.json.

        Launched on several processes, each batch is split over them (data parallel); with `spread`, whole
        domains are dealt out instead (process r takes domains r, r + n, ...), which is faster when there
        are at least as many domains as processes and batches are small. Rank 0 then gathers the results.
        """
        domains = domains if domains is not None else load_domains()
        n_proc = dist.group().size()
        if spread and n_proc > 1:
            names = list(domains)
            with dist.solo():
                for name in names[dist.group().rank() :: n_proc]:
                    self.distill_domain(name, domains[name], resume=resume, should_stop=should_stop)
            dist.world_barrier()
            out = Path(self.config.output_dir)
            results = {name: KDResult.model_validate_json((out / name / "result.json").read_text()) for name in names}
        else:
            results = {name: self.distill_domain(name, prompts, resume=resume, should_stop=should_stop)
                       for name, prompts in domains.items()}
        summary = {name: r.model_dump(mode="json") for name, r in results.items()}
        out = Path(self.config.output_dir)
        if dist.is_writer():
            atomic_write(out / "kd_summary.json", lambda p: p.write_text(json.dumps(summary, indent=2)))
        return results

    # ------------------------------------------------------------------------------------- signals

    def _reporter(self, domain: str, run_id: str, out_dir: Path) -> Reporter:
        """This run's one reporting path (metrics.jsonl, log, signals); a silent one on data-parallel helpers."""
        writer = dist.is_writer()  # one process speaks for a data-parallel run
        return Reporter(out_dir / "metrics.jsonl" if writer else None, self, log_every=self.config.iters // 10,
                        enabled=writer, domain=domain, run_id=run_id)

    @contextmanager
    def _failure_signal(self, report: Reporter, out_dir: Path):
        """Signal `distillation_failed` (with the checkpoint to resume from) for any exception, then re-raise."""
        try:
            yield
        except BaseException as e:
            if isinstance(e, TrainingDivergedError) and e.last_checkpoint is not None:
                last = str(e.last_checkpoint)
            else:
                ckpts = checkpoint_dirs(out_dir) if out_dir.is_dir() else []
                last = str(ckpts[-1]) if ckpts else None
            log.error("distillation failed", **report.context, error=str(e), error_type=type(e).__name__,
                      last_checkpoint=last)
            report.signal(signals.distillation_failed, error=str(e), error_type=type(e).__name__,
                          cancelled=isinstance(e, (TrainingCancelled, KeyboardInterrupt)), last_checkpoint=last)
            raise

    # ------------------------------------------------------------------------------------- judging

    def judge(self, student, held_out: list[str], logits_width: int | None = None) -> dict:
        """The student's figures on held-out prompts (`generation_metrics`) with the teacher's own beside them
        (`teacher_repetition`, `teacher_eos_rate`: what the student's are compared with), and a few answers."""
        g = self.config.generation
        n = self.config.eval_max_new_tokens
        t0 = time.perf_counter()
        with self.teacher_lock:
            teacher_answers = answer(self.teacher, self.teacher_tokenizer, held_out, n, g.system_prompt)
        student.eval()
        figures = generation_metrics(student, self.teacher, self.teacher_tokenizer, held_out,
                                     teacher_answers=teacher_answers, max_new_tokens=n,
                                     judging=Judging(g.system_prompt, logits_width, self.teacher_lock))
        figures.update({f"teacher_{k}": v for k, v in answer_figures(teacher_answers, self.teacher_tokenizer).items()})
        teacher_text = decoded_responses(teacher_answers, self.teacher_tokenizer)
        figures["examples"] = [{"prompt": p, "neuron": a, "teacher": t}
                               for p, a, t in list(zip(held_out, figures.pop("answers"), teacher_text))[:3]]
        figures["seconds"] = time.perf_counter() - t0
        return figures

    def cost(self, adapter: Path) -> dict:
        """Weight bytes of the neuron (its base student's files + its adapter) beside the teacher's in bf16."""
        from conch_dna.models import bf16_bytes, model_path
        from conch_dna.models.defaults import weight_bytes

        teacher_bf16 = bf16_bytes(self.teacher)
        folder = model_path(self.config.student_model_id)
        base = weight_bytes(folder) if folder is not None else None
        adapter_bytes = adapter.stat().st_size if adapter.is_file() else 0
        share = (base + adapter_bytes) / teacher_bf16 if base is not None else None
        return {"student_weight_bytes": base, "adapter_bytes": adapter_bytes, "teacher_bf16_bytes": teacher_bf16,
                "share_of_teacher_bf16": share}

    # ------------------------------------------------------------------------------------- helpers

    def _with_corpus(self, train: list[Example], val: list[Example], tokenizer):
        """The domain's examples with corpus windows (`corpus.py`): mixed at `text_share`, or alone."""
        from conch_dna.training.kd.corpus import CorpusWithAnswers, corpus_windows, tokenize_corpus

        cfg = self.config
        tokens = tokenize_corpus(tokenizer, cfg.text, Path(cfg.output_dir) / "corpus_cache",
                                 max_tokens=cfg.text_max_tokens, eos=eos_id(tokenizer))
        text_train, text_val = corpus_windows(tokens, cfg.max_seq_length, cfg.text_val_windows)
        log.info("text corpus ready", source=str(cfg.text), train_windows=len(text_train), val_windows=len(text_val),
                 window=cfg.max_seq_length)
        if cfg.text_share >= 1 or not train:
            return text_train, list(val) + list(text_val)
        return CorpusWithAnswers(text_train, train, 1 - cfg.text_share), list(val) + list(text_val)


    def _shared_vocab(self, student, student_tok, relation: dict) -> int | None:
        """Same tokenizer: the width to cut logits to when the student's embeddings are padded wider."""
        s_width = student.model.embed_tokens.weight.shape[0] if hasattr(student, "model") else None
        real = tokenizer_vocab_size(student_tok)
        log.info("tokenizers match: logits compared id by id", **relation)
        return real if s_width is not None and real < s_width else None

    def _cross_setup(self, cache: TeacherCache, student, student_tok, relation: dict):
        """Different tokenizers: re-tokenize and align the teacher's answers, map the vocabularies."""
        cfg = self.config
        if cfg.teacher_targets != "online":
            raise CrossTokenizerError("teacher and student tokenizers differ: cached top-k targets are over the "
                                      "teacher's ids and cannot be aligned later; use teacher_targets = 'online'")
        if cfg.on_policy_lambda > 0 or cfg.own_answers == "on":
            raise CrossTokenizerError("the student's own answers (on_policy_lambda > 0, own_answers = 'on') are not "
                                      "supported across tokenizers yet: set on_policy_lambda = 0, own_answers = 'auto'")
        t_width = self.teacher(mx.array([[0]])).shape[-1]
        s_width = student(mx.array([[0]])).shape[-1]
        vmap = build_vocab_map(self.teacher_tokenizer, student_tok, t_width, s_width)
        examples, align = cross_examples(cache.examples, self.teacher_tokenizer, student_tok, cfg.max_seq_length,
                                         cfg.generation.system_prompt)
        if not examples:
            raise DataError("no teacher answer survived re-tokenization for the student (all empty or truncated)")
        figures = {**{k: v for k, v in relation.items() if k != "relation"}, **vmap.figures, **align,
                   "method": "mapped"}
        log.info("tokenizers differ: exact-match vocabulary mapping + ULD on the rest", **figures)
        return examples, {"vmap": vmap_arrays(vmap), "figures": figures}


__all__ = ["Example", "KDResult", "OutputDirError", "TrueKnowledgeDistiller", "registry_metrics"]
