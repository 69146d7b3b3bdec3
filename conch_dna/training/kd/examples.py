"""Teacher data as token sequences: the teacher answers prompts (batched, through the chat template), answers
already written are taken as they are, and the trainer's batches are padded and ordered as a function of
(seed, step) alone.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
import structlog

from conch_dna._faults import fault_point
from conch_dna.neuron import DataError, chat_prompt_ids, eos_id

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Example:
    """One training sequence: prompt + response token ids; the loss applies to the response only."""

    tokens: tuple[int, ...]
    prompt_len: int
    prompt: str = field(default="", compare=False)  # the prompt's text (re-tokenized for another tokenizer)


def decode_together(n: int) -> dict:
    """`batch_generate`'s setting that decodes all `n` prompts at once. mlx-lm's BatchGenerator otherwise
    decodes at most 32 at a time whatever the batch it is given, so a larger `generation.batch_size` bought
    nothing (one H100 wrote ~650-700 tokens/s at batch 22 and at 268). Up to 32 prompts nothing changes."""
    return {"completion_batch_size": max(32, n)}


def generate_examples(model, tokenizer, prompts: list[str], config, lock=None, on_batch=None) -> tuple[list[Example], dict]:
    """The teacher answers each prompt (batched sampling, as `config.generation` says, seeded by `config.seed`);
    returns examples and throughput figures.

    A prompt that leaves no room for a response within `max_seq_length` is an error naming it.
    Responses that end with EOS keep the EOS token, so students learn to stop. `lock` (if given) is held
    around each batch only, so that other users of a shared live model (EGO answering) are not starved.
    `on_batch(done)` (if given) is called after each batch with the number of prompts answered so far; an
    exception it raises (a cancel) stops the generation.
    """
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    gen, max_seq_length = config.generation, config.max_seq_length
    if not prompts:
        raise DataError("no prompts given: pass at least one prompt (or use a domain from config/domains.toml)")
    prompt_ids = [chat_prompt_ids(tokenizer, p, gen.system_prompt) for p in prompts]
    for p, ids in zip(prompts, prompt_ids):
        if len(ids) >= max_seq_length - 1:
            raise DataError(
                f"prompt of {len(ids)} tokens does not fit max_seq_length={max_seq_length} with room for an answer: "
                f"{p[:60]!r}... Shorten it or raise max_seq_length."
            )
    eos = eos_id(tokenizer)
    mx.random.seed(config.seed)
    sampler = make_sampler(temp=gen.temperature, top_p=gen.top_p if gen.temperature > 0 else 0.0)
    examples, n_gen = [], 0
    t0 = time.perf_counter()
    for start in range(0, len(prompt_ids), gen.batch_size):
        chunk = prompt_ids[start : start + gen.batch_size]
        budgets = [min(gen.max_new_tokens, max_seq_length - len(ids)) for ids in chunk]
        with lock or nullcontext():
            out = batch_generate(model, tokenizer, chunk, max_tokens=budgets, sampler=sampler, return_token_ids=True,
                                 **decode_together(len(chunk)))
        fault_point("generation")
        for ids, resp, budget, text in zip(chunk, out.token_ids, budgets, prompts[start : start + gen.batch_size]):
            resp = list(resp)
            n_gen += len(resp)
            if eos is not None and len(resp) < budget:
                resp.append(eos)  # stopped on EOS (batch_generate drops the stop token)
            if not resp:
                continue
            examples.append(Example(tuple(ids + resp)[:max_seq_length], len(ids), text))
        if on_batch is not None:
            on_batch(min(start + gen.batch_size, len(prompt_ids)))
    seconds = time.perf_counter() - t0
    stats = {"samples": len(examples), "generated_tokens": n_gen, "seconds": seconds,
             "tokens_per_second": n_gen / seconds if seconds > 0 else 0.0,
             "tokens": sum(len(e.tokens) for e in examples)}
    return examples, stats


def answered_examples(tokenizer, answered: list[tuple[str, list[int]]], system_prompt: str | None,
                      max_seq_length: int) -> list[Example]:
    """Examples from answers the teacher already wrote (EGO's experience: prompt, answer token ids), cut to
    `max_seq_length`; prompts that leave no room for an answer are skipped."""
    out = []
    for prompt, ids in answered:
        prompt_ids = chat_prompt_ids(tokenizer, prompt, system_prompt)
        if len(prompt_ids) < max_seq_length - 1 and ids:
            out.append(Example(tuple(prompt_ids + list(ids))[:max_seq_length], len(prompt_ids), prompt))
    return out


def continue_prompts(model, tokenizer, examples: list[Example], gen, max_seq_length: int, lock=None) -> list[Example]:
    """New examples: the same prompts, answered by `model` (on-policy data: the student writes) as `gen` (a
    `GenerationConfig`: max_new_tokens, temperature, top_p) says."""
    max_new_tokens, temperature, top_p = gen.max_new_tokens, gen.temperature, gen.top_p
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    prompts = [list(e.tokens[: e.prompt_len]) for e in examples]
    budgets = [max(1, min(max_new_tokens, max_seq_length - len(p))) for p in prompts]
    sampler = make_sampler(temp=temperature, top_p=top_p if temperature > 0 else 0.0)
    eos = eos_id(tokenizer)
    with lock or nullcontext():
        out = batch_generate(model, tokenizer, prompts, max_tokens=budgets, sampler=sampler, return_token_ids=True,
                             **decode_together(len(prompts)))
    new = []
    for p, resp, budget, old in zip(prompts, out.token_ids, budgets, examples):
        resp = list(resp) + ([eos] if eos is not None and len(resp) < budget else [])
        new.append(Example(tuple(p + resp)[:max_seq_length], len(p), old.prompt) if resp else old)
    return new


def split_examples(examples: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded split; at least one training example, and one validation example when asked for any."""
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = min(len(examples) - 1, max(1 if val_fraction > 0 else 0, round(len(examples) * val_fraction)))
    val = [examples[i] for i in sorted(order[:n_val])]
    train = [examples[i] for i in sorted(order[n_val:])]
    return train, val


def pad_batch(examples: list[Example], pad_id: int = 0, multiple: int = 1) -> tuple[mx.array, mx.array]:
    """tokens [B, L] (right-padded) and loss_mask [B, L] (true on response tokens only).

    `multiple` rounds L up (a compiled step recompiles for every new shape; padding is masked and, being
    on the right of a causal model, changes nothing)."""
    width = max(len(e.tokens) for e in examples)
    width = -(-width // multiple) * multiple
    tokens = np.full((len(examples), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(examples), width), dtype=bool)
    for i, e in enumerate(examples):
        tokens[i, : len(e.tokens)] = e.tokens
        mask[i, e.prompt_len : len(e.tokens)] = True
    return mx.array(tokens), mx.array(mask)


def batch_order(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Example indices of global batch `step`: epochs are seeded permutations, so any step is recomputable
    from (seed, step) alone. That is what makes resuming exact without saving a data cursor."""
    per_epoch = max(1, n // batch_size) if n >= batch_size else 1
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    if n < batch_size:  # tiny data sets: wrap around
        return [int(perm[i % n]) for i in range(batch_size)]
    return [int(i) for i in perm[k * batch_size : (k + 1) * batch_size]]
