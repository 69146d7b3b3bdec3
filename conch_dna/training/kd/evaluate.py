"""Evaluation of students against their teacher, reusable by benchmarks, the CORTEX quality gate and users.

All figures are token-weighted over the scored tokens (response tokens of examples; every predicted token
of a text), computed from exact dense logits in float32:

* `compare_to_teacher`: per-token KL(teacher || student) at T = 1, teacher-student top-1 agreement, and the
  student's perplexity on the (teacher's) responses.
* `text_perplexity`: perplexity on real human text (a file or a string), in non-overlapping windows.
* `generation_metrics`: what a user of a neuron sees on held-out prompts: the model's own greedy answers
  (repeated 4-grams, the teacher's NLL of them, the share that end with EOS) beside KL and agreement on the
  teacher's answers. The distiller reports it for every neuron and the CORTEX quality gate judges by it.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from conch_dna.neuron import chat_prompt_ids, eos_id
from conch_dna.training.kd.examples import Example, decode_together, pad_batch
from conch_dna.training.kd.losses import next_token_view, token_cross_entropy, token_divergence


def compare_to_teacher(student, teacher, examples: list[Example], batch_size: int = 4, logits_width: int | None = None) -> dict:
    """{"kl": mean KL(teacher||student), "agreement": top-1 agreement, "response_ppl": student perplexity,
    "tokens": scored tokens} over the response tokens of `examples`, and `per_example`: each example's summed
    KL, agreeing tokens and scored tokens (for intervals over prompts)."""
    kl, agree, tokens, ce = [], [], [], 0.0
    for start in range(0, len(examples), batch_size):
        batch, mask = pad_batch(examples[start : start + batch_size])
        s_logits, t_logits = student(batch), teacher(batch)
        if logits_width is not None:
            s_logits, t_logits = s_logits[..., :logits_width], t_logits[..., :logits_width]
        s, targets, m = next_token_view(s_logits, batch, mask)
        t = t_logits[:, :-1]
        mf = m.astype(mx.float32)
        parts = [
            (token_divergence(t, s, 1.0) * mf).sum(axis=-1),
            ((mx.argmax(s, axis=-1) == mx.argmax(t, axis=-1)) & m).sum(axis=-1),
            mf.sum(axis=-1),
            (token_cross_entropy(s, targets) * mf).sum(),
        ]
        mx.eval(parts)
        kl += parts[0].tolist()
        agree += parts[1].tolist()
        tokens += parts[2].tolist()
        ce += parts[3].item()
    d = max(sum(tokens), 1.0)
    return {"kl": sum(kl) / d, "agreement": sum(agree) / d, "response_ppl": math.exp(ce / d), "tokens": int(sum(tokens)),
            "per_example": {"kl": kl, "agreeing": agree, "tokens": tokens}}


# Intervals are percentile bootstraps over prompts: the prompts are the sample, each resample draws as many
# prompts with replacement and pools their tokens (or 4-grams) as the figure itself does. 90% two-sided, so
# each bound alone is a one-sided 95% bound: what the quality gate decides on.
INTERVAL_LEVEL = 0.90
RESAMPLES = 2000


def pooled_interval(numerators, denominators, minus: tuple | None = None, *, level: float = INTERVAL_LEVEL,
                    resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """The bootstrap interval of sum(numerators) / sum(denominators) over prompts (one entry per prompt); with
    `minus` = (numerators, denominators) of the same prompts, of the difference of the two pooled figures, each
    resample drawing the same prompts for both (a paired comparison)."""
    num, den = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1 or num.size == 0:
        raise ValueError(f"an interval needs one numerator and one denominator per prompt, got {num.shape} and {den.shape}")
    picks = np.random.default_rng(seed).integers(0, num.size, size=(resamples, num.size))

    def pooled(n, d):
        return n[picks].sum(axis=1) / np.maximum(d[picks].sum(axis=1), 1e-12)

    stat = pooled(num, den)
    if minus is not None:
        stat = stat - pooled(np.asarray(minus[0], dtype=np.float64), np.asarray(minus[1], dtype=np.float64))
    low, high = np.quantile(stat, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def text_perplexity(model, tokenizer, text: str | os.PathLike, max_tokens: int = 2048, window: int = 512) -> dict:
    """Perplexity of `model` on real text (a path or a string), over up to `max_tokens` tokens."""
    if isinstance(text, Path) or (isinstance(text, str) and len(text) < 4096 and Path(text).is_file()):
        text = Path(text).read_text(encoding="utf-8")
    ids = tokenizer.encode(text)[: max_tokens + 1]
    if len(ids) < 2:
        raise ValueError("the text is too short to measure perplexity (needs at least 2 tokens)")
    total, n = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = mx.array(ids[start : start + window + 1])[None]
        if chunk.shape[1] < 2:
            break
        ce = token_cross_entropy(model(chunk[:, :-1]), chunk[:, 1:]).sum()
        total += ce.item()
        n += chunk.shape[1] - 1
    return {"ppl": math.exp(total / n), "tokens": n}


# ------------------------------------------------------------------------ what a user of the neuron sees


def repeated_ngram_counts(ids: list[int], n: int = 4) -> tuple[int, int]:
    """(n-grams of one answer that already occurred earlier in it, n-grams in it)."""
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    for i in range(len(ids) - n + 1):
        gram = tuple(ids[i : i + n])
        repeats += gram in seen
        seen.add(gram)
    return repeats, max(len(ids) - n + 1, 0)


def repeated_ngram_share(answers: list[list[int]], n: int = 4) -> float:
    """Share of the answers' token n-grams that already occurred earlier in the same answer, pooled over
    answers. 0 for text that never repeats itself; a model stuck in a loop ("The hash-table is a
    hash-table." five times) scores close to 1."""
    return pooled_share([repeated_ngram_counts(ids, n) for ids in answers])


def pooled_share(counts: list[tuple[int, int]]) -> float:
    """sum(repeats) / sum(n-grams) of per-answer `repeated_ngram_counts`."""
    total = sum(t for _, t in counts)
    return sum(r for r, _ in counts) / total if total else 0.0


def responses(answers: list[Example]) -> list[list[int]]:
    """The response token ids of answers (what follows each prompt)."""
    return [list(e.tokens[e.prompt_len :]) for e in answers]


def answer(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, system_prompt: str | None = None,
           batch_size: int = 16) -> list[Example]:
    """`model`'s own greedy answers to `prompts` (chat template), as examples; an answer that stopped on EOS
    ends with the EOS token, so `ended` can tell it from one cut at `max_new_tokens`. A domain's 16 held-out
    prompts go as one batch: decoding reads all the weights every step, so on 2 CPU cores 20 answers of 64
    tokens took 32 s as one batch of 20 and 39 s as two of 10 (the float32 135M teacher)."""
    from mlx_lm.generate import batch_generate

    eos = eos_id(tokenizer)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids = [chat_prompt_ids(tokenizer, p, system_prompt) for p in chunk]
        gen = batch_generate(model, tokenizer, ids, max_tokens=max_new_tokens, return_token_ids=True, **decode_together(len(ids)))
        for p, prompt_ids, resp in zip(chunk, ids, gen.token_ids):
            resp = list(resp) + ([eos] if eos is not None and len(resp) < max_new_tokens else [])
            out.append(Example(tuple(prompt_ids + resp), len(prompt_ids), p))
    return out


def answer_figures(answers: list[Example], tokenizer) -> dict:
    """What can be read off answers alone: `repetition` (`repeated_ngram_share` of the responses) and
    `eos_rate` (the share that stopped by themselves, i.e. end with EOS)."""
    return {"repetition": repeated_ngram_share(responses(answers)), "eos_rate": eos_rate(answers, tokenizer)}


def eos_rate(answers: list[Example], tokenizer) -> float:
    """The share of answers that stopped by themselves (end with EOS)."""
    eos = eos_id(tokenizer)
    ids = responses(answers)
    return sum(bool(r) and r[-1] == eos for r in ids) / max(len(ids), 1)


def decoded_responses(answers: list[Example], tokenizer) -> list[str]:
    eos = eos_id(tokenizer)
    return [tokenizer.decode([t for t in e.tokens[e.prompt_len :] if t != eos]) for e in answers]


def response_nll(model, examples: list[Example], batch_size: int = 4, logits_width: int | None = None) -> float:
    """`model`'s mean per-token negative log-likelihood of the examples' responses: the teacher scoring the
    student's own answers says how likely the teacher finds what the student writes."""
    total = n = 0.0
    for start in range(0, len(examples), batch_size):
        tokens, mask = pad_batch(examples[start : start + batch_size])
        logits = model(tokens)
        logits = logits[..., :logits_width] if logits_width is not None else logits
        s, targets, m = next_token_view(logits, tokens, mask)
        mf = m.astype(mx.float32)
        parts = [(token_cross_entropy(s, targets) * mf).sum(), mf.sum()]
        mx.eval(parts)
        total, n = total + parts[0].item(), n + parts[1].item()
    return total / max(n, 1.0)


class Judging(NamedTuple):
    """How a judgement runs: the system prompt the answers are asked with, the width logits are cut to (a
    padded vocabulary's real one), and the lock held around a shared live teacher."""

    system_prompt: str | None = None
    logits_width: int | None = None
    teacher_lock: object = None


NO_JUDGING = Judging()


def generation_metrics(model, teacher, tokenizer, prompts: list[str], *, teacher_answers: list[Example] | None = None,
                       max_new_tokens: int = 64, judging: Judging = NO_JUDGING) -> dict:
    """What a user sees of `model` on held-out `prompts`, beside the teacher (same tokenizer):

    * on the teacher's greedy answers: `kl` (KL(teacher || model), T = 1) and top-1 `agreement`;
    * on the model's own greedy answers: `repetition` (`repeated_ngram_share`, 4-grams), `teacher_nll`
      (the teacher's mean per-token NLL of them) and `eos_rate` (share that stop by themselves within
      `max_new_tokens`);
    * intervals over prompts (`intervals`): `kl_low`, `kl_high`, ..., and `repetition_excess` (the model's
      repetition minus the teacher's on the same prompts) with `repetition_excess_low` / `_high`.

    Pass `teacher_answers` (from `answer(teacher, ...)`) when scoring several models on the same prompts.
    `judging.teacher_lock` is held around the teacher's passes only (a live EGO keeps answering while the
    model writes).
    Returns the figures, each answer's own `repetitions` and the model's `answers` (text)."""
    if not prompts:
        raise ValueError("generation_metrics needs at least one held-out prompt")
    system_prompt, logits_width, teacher_lock = judging
    with teacher_lock or nullcontext():
        if teacher_answers is None:
            teacher_answers = answer(teacher, tokenizer, prompts, max_new_tokens, system_prompt)
        on_teacher = compare_to_teacher(model, teacher, teacher_answers, logits_width=logits_width)
    own = answer(model, tokenizer, prompts, max_new_tokens, system_prompt)
    with teacher_lock or nullcontext():
        nll = response_nll(teacher, own, logits_width=logits_width)
    mine = [repeated_ngram_counts(ids) for ids in responses(own)]  # each answer's 4-grams, counted once
    theirs = [repeated_ngram_counts(ids) for ids in responses(teacher_answers)]
    return {
        "kl": on_teacher["kl"], "agreement": on_teacher["agreement"],
        "repetition": pooled_share(mine), "eos_rate": eos_rate(own, tokenizer),
        "teacher_nll": nll,
        "prompts": len(prompts),
        **intervals(on_teacher["per_example"], mine, theirs),
        # per answer, so methods judged on the same prompts can be compared prompt by prompt
        "repetitions": [pooled_share([c]) for c in mine],
        "answers": decoded_responses(own, tokenizer),
    }


def intervals(per_example: dict, mine: list[tuple[int, int]], theirs: list[tuple[int, int]]) -> dict:
    """`<figure>_low` / `<figure>_high` (`pooled_interval`) of KL, agreement and repetition, and
    `repetition_excess`: the neuron's repetition minus the teacher's on the same prompts, with its interval.
    `mine` and `theirs`: `repeated_ngram_counts` of the neuron's and the teacher's answers, prompt by prompt."""
    rep, teacher_rep = [r for r, _ in mine], [r for r, _ in theirs]
    grams, teacher_grams = [t for _, t in mine], [t for _, t in theirs]
    out = {}
    for name, num in (("kl", per_example["kl"]), ("agreement", per_example["agreeing"])):
        out[f"{name}_low"], out[f"{name}_high"] = pooled_interval(num, per_example["tokens"])
    out["repetition_low"], out["repetition_high"] = pooled_interval(rep, grams)
    out["repetition_excess"] = sum(rep) / max(sum(grams), 1) - sum(teacher_rep) / max(sum(teacher_grams), 1)
    out["repetition_excess_low"], out["repetition_excess_high"] = pooled_interval(rep, grams, (teacher_rep, teacher_grams))
    return out


def generation_speed(model, tokenizer, prompt: str, max_new_tokens: int = 64) -> float:
    """Single-stream greedy generation tokens/s on one chat prompt (after a warm-up): what serving costs."""
    from mlx_lm import stream_generate

    ids = chat_prompt_ids(tokenizer, prompt)
    for _ in stream_generate(model, tokenizer, ids, max_tokens=4):
        pass
    responses = list(stream_generate(model, tokenizer, ids, max_tokens=max_new_tokens))
    return float(responses[-1].generation_tps) if responses else 0.0
