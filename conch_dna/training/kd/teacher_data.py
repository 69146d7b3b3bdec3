"""The teacher's answers to a domain's prompts: generated in batches (or taken as the teacher already wrote
them, EGO's experience), with top-k targets when the run trains on cached targets, and kept in the teacher
cache (`teacher_cache.TeacherCache`) while the teacher, its tokenizer, the prompts and the generation settings
are the same. The first process of a data-parallel run writes it; the others read it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from conch_dna.neuron import DataError
from conch_dna.training.kd import distributed as dist
from conch_dna.training.kd.config import KDConfig
from conch_dna.training.kd.examples import Example, answered_examples, generate_examples
from conch_dna.training.kd.teacher_cache import (
    TeacherCache,
    cache_key,
    compute_sparse_targets,
    fingerprint_tokenizer,
)
from conch_dna.training.kd.vocab import tokenizer_vocab_size

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Teacher:
    """The teacher as its data needs it: the model, its tokenizer, the lock held around it (a live EGO model
    is shared with the threads that answer users) and its content fingerprint (`fingerprint_model`)."""

    model: object
    tokenizer: object
    lock: object
    fingerprint: str


def teacher_data(teacher: Teacher, config: KDConfig, prompts: list[str], domain: str,
                 answered: list[tuple[str, list[int]]], on_batch: Callable[[int], None] | None = None
                 ) -> tuple[TeacherCache, dict]:
    """The domain's teacher data and the generation's figures: read from the cache when its inputs are
    unchanged, else generated (`on_batch(done)` after each batch of prompts; an exception it raises stops the
    generation and caches nothing), stored and read back, so every run trains on the stored bits."""
    answered = [(p, list(ids)) for p, ids in answered]
    if not prompts and not answered:
        raise DataError(f"no prompts for domain {domain!r}: pass at least one prompt")
    check_answer_ids(teacher, answered)
    key = cache_key(
        teacher=teacher.fingerprint, tokenizer=fingerprint_tokenizer(teacher.tokenizer),
        prompts=prompts, generation=config.generation.model_dump(), max_seq_length=config.max_seq_length,
        targets=config.top_k if config.teacher_targets == "cache" else None, seed=config.seed,
        **({"answered": answered} if answered else {}),
    )
    folder = Path(config.output_dir) / "teacher_cache" / key
    if not dist.is_writer():  # rank 0 writes the teacher data once; the other processes read it
        dist.barrier()
        cache = TeacherCache.load(folder)
        return cache, {**cache.meta.get("generation_stats", {}), "cached": True, "cache_key": key}
    if (folder / "meta.json").is_file():
        cache = TeacherCache.load(folder)
        dist.barrier()
        log.info("teacher cache hit", domain=domain, folder=str(folder), samples=len(cache.examples))
        return cache, {**cache.meta.get("generation_stats", {}), "cached": True, "cache_key": key}
    examples, stats = teacher_answers(teacher, config, prompts, domain, answered, on_batch)
    return _stored(teacher, config, examples, stats, folder, domain, key)


def _stored(teacher: Teacher, config: KDConfig, examples: list[Example], stats: dict, folder: Path, domain: str,
            key: str) -> tuple[TeacherCache, dict]:
    """The examples (with top-k targets for cached targets) written to the cache and read back from it."""
    targets = []
    if config.teacher_targets == "cache":  # online training scores every batch itself: store answers only
        t0 = time.perf_counter()
        targets = compute_sparse_targets(teacher.model, examples, config.top_k, config.generation.batch_size,
                                         lock=teacher.lock)
        stats["target_seconds"] = time.perf_counter() - t0
    vocab = tokenizer_vocab_size(teacher.tokenizer)
    cache = TeacherCache(examples, targets, {"key": key, "domain": domain, "teacher": config.teacher_model_id,
                                              "top_k": config.top_k, "vocab_size": vocab, "generation_stats": stats})
    cache.save(folder)
    dist.barrier()
    # Train from what was stored (float16 logits), so a fresh run and a resumed or cached run see
    # exactly the same targets.
    cache = TeacherCache.load(folder)
    if targets:
        stats["cache_bytes_per_token"] = cache.bytes_per_token()
        stats["dense_bf16_bytes_per_token"] = 2 * vocab
    log.info("teacher data ready", domain=domain, samples=len(examples), tokens=stats["tokens"],
             seconds=round(stats["seconds"], 2), gen_tokens_per_second=round(stats["tokens_per_second"], 1))
    return cache, {**stats, "cached": False, "cache_key": key}


def teacher_answers(teacher: Teacher, config: KDConfig, prompts: list[str], domain: str,
                    answered: list[tuple[str, list[int]]], on_batch: Callable[[int], None] | None = None):
    """The teacher's answers to `prompts` and the answers it already wrote (`answered`), as examples; and the
    generation's figures."""
    examples, stats = generate_examples(teacher.model, teacher.tokenizer, prompts, config, lock=teacher.lock,
                                        on_batch=on_batch) if prompts else ([], {"seconds": 0.0, "tokens_per_second": 0.0})
    if answered:  # EGO's own earlier answers: no regeneration
        examples += answered_examples(teacher.tokenizer, answered, config.generation.system_prompt, config.max_seq_length)
        stats.update(samples=len(examples), answered=len(answered), tokens=sum(len(e.tokens) for e in examples))
    if not examples:
        raise DataError(f"the teacher produced no responses for domain {domain!r}")
    return examples, stats


def check_answer_ids(teacher: Teacher, answered: list[tuple[str, list[int]]]) -> None:
    """Answers given as token ids (EGO's experience) hold only ids the teacher has: an id past its
    vocabulary would index outside the embedding."""
    if not answered:
        return
    limit = tokenizer_vocab_size(teacher.tokenizer)
    rows = getattr(getattr(teacher.model, "args", None), "vocab_size", None)
    limit = min(limit, rows) if isinstance(rows, int) else limit
    for prompt, ids in answered:
        if bad := [t for t in ids if type(t) is not int or not 0 <= t < limit]:
            raise DataError(f"the answer to {prompt[:60]!r} holds token id {bad[0]!r}, outside the teacher's "
                            f"vocabulary of {limit}: it was not written by this teacher, or its record is corrupt")
