"""Knowledge-distillation losses: pure functions on `mx.array`, no model, no loop.

Conventions (every function here follows them, so that bugs peers ship cannot happen silently):

* Logits are [..., V]; anything else is [...]. Computation is float32 whatever the input dtype
  (bf16 soft targets lose the tail of the distribution and can make JSD negative).
* Every divergence is between *temperature-softened* distributions p = softmax(teacher / T),
  q = softmax(student / T) and is multiplied by T^2 (Hinton et al. 2015: keeps the gradient scale of the
  soft term independent of T, so alpha means the same thing at every temperature).
* Reduction happens in one place, `masked_mean`: the sum over unmasked token positions of the whole batch
  divided by their count. Every token weighs the same whatever its sequence's length (no mean of
  per-sequence means). An all-masked batch gives 0 (with a warning), never NaN.
* `next_token_view` is the one place that shifts (logits at t predict token t+1) and applies the loss
  mask (response tokens only: prompt and padding contribute nothing to loss or gradient).
* `-inf` logits (masked vocabulary entries) are allowed: terms with zero probability are dropped with
  `mx.where`, never multiplied as 0 * -inf.

Divergences (`DIVERGENCES`), with p the teacher and q the student:
  forward_kl  KL(p || q) = sum p (log p - log q)             mode-covering; Hinton's KD
  reverse_kl  KL(q || p) = sum q (log q - log p)             mode-seeking; MiniLLM, on-policy KD
  jsd         generalized JSD(beta) (GKD, Agarwal et al. 2024) with m = beta p + (1 - beta) q:
              beta KL(p || m) + (1 - beta) KL(q || m).  beta = 0.5 is the symmetric JSD, bounded by log 2.
              Limits: as beta -> 0, JSD/beta -> KL(p || q) (forward); as beta -> 1, JSD/(1-beta) -> KL(q || p)
              (reverse). At exactly beta = 0 or 1 the mixture collapses onto one side and the divergence
              would be identically 0, so, as TRL's GKD does, the end points are defined as those limits:
              beta = 0 is forward KL and beta = 1 is reverse KL.
  tvd         total variation 0.5 * sum |p - q|

Sparse (cached) teacher targets: `SparseTargets(logits, indices, logsumexp)` keeps the teacher's top-k raw
logits, their vocabulary ids and the log-sum-exp of the full raw row. The distribution is coarse-grained to
k + 1 outcomes: the k cached tokens and one "tail" bucket holding all other tokens. The student is
coarse-grained the same way (its tail mass is computed exactly from its full row). At T = 1 the teacher's
tail mass is exact, and by the data-processing inequality the bucketed divergence is a lower bound of the
dense one that converges to it as the tail mass vanishes. At T != 1 the tail's tempered mass depends on the
shape of the uncached logits: we continue the top-k's own decay as a power law in rank (logit = a + b log r,
b fitted on the lower half of the sorted top-k, `a` fixed by the exact T = 1 tail mass); with k < 8 the tail
is taken as flat. This is why raw logits and the row log-sum-exp are cached rather than probabilities: the
temperature can change after caching.
tests/test_losses.py measures the error against the dense loss.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import mlx.core as mx

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
_F32_EPS = 2.0**-23
IGNORE_INDEX = -100


class SparseTargets(NamedTuple):
    """Top-k teacher targets: raw logits [..., k], their vocabulary ids [..., k], full-row logsumexp [...]."""

    logits: mx.array
    indices: mx.array
    logsumexp: mx.array


# ------------------------------------------------------------------------------------- reduction / mask


def masked_mean(values: mx.array, mask: mx.array | None = None) -> mx.array:
    """Mean of `values` over positions where `mask` is true, across the whole batch (token-weighted)."""
    values = values.astype(mx.float32)
    if mask is None:
        return values.mean()
    mask = mask.astype(mx.float32)
    n = mask.sum()
    _warn_if_empty(n)
    # where, not multiply: a masked position's value may be inf (e.g. a padding row), and inf * 0 = NaN.
    return mx.where(mask > 0, values, 0.0).sum() / mx.maximum(n, 1.0)


def _warn_if_empty(n: mx.array) -> None:
    # The mask never depends on parameters, so reading it is safe under grad; under mx.compile it cannot
    # be read (placeholder), and the warning is skipped: the result is still 0, not NaN.
    try:
        empty = n.item() == 0
    except (ValueError, RuntimeError):
        return
    if empty:
        warnings.warn("all token positions are masked: the loss is 0 for this batch", RuntimeWarning, stacklevel=4)


def next_token_view(logits: mx.array, tokens: mx.array, loss_mask: mx.array):
    """Align logits with the tokens they predict and with the loss mask.

    logits [B, L, V] from a forward pass over `tokens` [B, L]; `loss_mask` [B, L] is true on response
    tokens (false on prompt and padding). Returns (logits[:, :-1], targets = tokens[:, 1:],
    mask = loss_mask[:, 1:]): the prediction made at position t is scored iff token t+1 is a response token.
    """
    if logits.shape[:2] != tokens.shape or tokens.shape != loss_mask.shape:
        raise ValueError(f"shape mismatch: logits {logits.shape}, tokens {tokens.shape}, loss_mask {loss_mask.shape}")
    return logits[:, :-1], tokens[:, 1:], loss_mask[:, 1:].astype(mx.bool_)


# ----------------------------------------------------------------------------------- per-token divergences


def _xlogy_diff(p: mx.array, logp: mx.array, logq: mx.array) -> mx.array:
    """sum p (log p - log q) over the last axis, with 0 * anything = 0 where p == 0."""
    safe = mx.where(p > 0, logp - logq, 0.0)
    return (p * safe).sum(axis=-1)


def _divergence_from_logprobs(logp: mx.array, logq: mx.array, divergence: str, beta: float) -> mx.array:
    """Per-position divergence between two (possibly coarse-grained) log-distributions, last axis."""
    p, q = mx.exp(logp), mx.exp(logq)
    if divergence == "jsd":
        if beta <= 0.0:
            divergence = "forward_kl"
        elif beta >= 1.0:
            divergence = "reverse_kl"
    if divergence == "forward_kl":
        return _xlogy_diff(p, logp, logq)
    if divergence == "reverse_kl":
        return _xlogy_diff(q, logq, logp)
    if divergence == "jsd":
        # log m = logaddexp(log beta + log p, log(1-beta) + log q): stable, and m > 0 wherever p or q is.
        # Where both are -inf (a masked vocabulary entry) logaddexp's gradient is NaN even when unused,
        # so those entries get finite stand-ins and m = 0 is written back explicitly.
        both_inf = mx.logical_and(logp == -mx.inf, logq == -mx.inf)
        a = mx.where(both_inf, 0.0, logp) + math.log(beta)
        b = mx.where(both_inf, 0.0, logq) + math.log1p(-beta)
        logm = mx.where(both_inf, -mx.inf, mx.logaddexp(a, b))
        return beta * _xlogy_diff(p, logp, logm) + (1.0 - beta) * _xlogy_diff(q, logq, logm)
    if divergence == "tvd":
        return 0.5 * mx.abs(p - q).sum(axis=-1)
    raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")


def _check(divergence: str, temperature: float, beta: float) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")


def _sparse_logprobs(teacher: SparseTargets, student_logits: mx.array, temperature: float):
    """Coarse-grain teacher and student to (k cached tokens + 1 tail bucket) tempered log-probs."""
    t_logits = teacher.logits.astype(mx.float32)
    lse = teacher.logsumexp.astype(mx.float32)[..., None]
    vocab = student_logits.shape[-1]
    k = t_logits.shape[-1]
    s = student_logits.astype(mx.float32) / temperature
    s_lse = mx.logsumexp(s, axis=-1, keepdims=True)
    idx = teacher.indices.astype(mx.int32)
    s_top = mx.take_along_axis(s, idx, axis=-1)
    if k >= vocab:  # every token is cached: no tail bucket, the result is the dense divergence
        t_scaled = t_logits / temperature
        return t_scaled - mx.logsumexp(t_scaled, axis=-1, keepdims=True), s_top - s_lse
    # Teacher tail mass at T = 1, exactly: log(1 - sum_k p_k), computed as lse + log1p(-exp(lse_k - lse)).
    lse_k = mx.logsumexp(t_logits, axis=-1, keepdims=True)
    # When the tail holds less than float32's resolution (1 - frac rounds to 0) it is floored at that
    # resolution, not set to 0: a zero tail would make reverse KL / JSD infinite for any student.
    frac = mx.minimum(mx.exp(lse_k - lse), 1.0 - _F32_EPS)
    log_tail = lse + mx.log1p(-frac)
    # Its tempered mass needs the tail's shape, which was not cached. LM logits fall roughly linearly in
    # log(rank), so the tail continues the top-k's own decay: logit(r) = a + b log r for ranks k < r <= V,
    # with b fitted on the lower half of the sorted top-k and `a` set so the T = 1 tail mass stays exact.
    b = _log_rank_slope(t_logits)
    a = log_tail - _log_power_sum(b, k, vocab)
    tail_logit = a / temperature + _log_power_sum(b / temperature, k, vocab)
    t_scaled = mx.concatenate([t_logits / temperature, tail_logit], axis=-1)
    logp = t_scaled - mx.logsumexp(t_scaled, axis=-1, keepdims=True)

    # The student's tail: logsumexp over the entries not cached, exact (no 1 - sum cancellation).
    s_tail = mx.logsumexp(mx.put_along_axis(s, idx, mx.array(-mx.inf, dtype=s.dtype), axis=-1), axis=-1, keepdims=True)
    logq = mx.concatenate([s_top, s_tail], axis=-1) - s_lse
    return logp, logq


def _log_rank_slope(top_logits: mx.array) -> mx.array:
    """Per-row least-squares slope of logit vs log(rank) over the lower half of the top-k (<= 0)."""
    k = top_logits.shape[-1]
    if k < 8:  # too few points for a slope: assume a flat (uniform) tail
        return mx.zeros((*top_logits.shape[:-1], 1))
    y = mx.sort(top_logits, axis=-1)[..., ::-1][..., k // 2 :]
    x = mx.log(mx.arange(k // 2 + 1, k + 1, dtype=mx.float32))
    xc = x - x.mean()
    slope = ((y - y.mean(axis=-1, keepdims=True)) * xc).sum(axis=-1, keepdims=True) / (xc * xc).sum()
    return mx.minimum(slope, 0.0)


def _log_power_sum(c: mx.array, k: int, vocab: int) -> mx.array:
    """log sum_{r=k+1}^{V} r^c, by the midpoint integral of r^c over [k + 1/2, V + 1/2]."""
    lo, hi = math.log(k + 0.5), math.log(vocab + 0.5)
    e = c + 1.0
    small = mx.abs(e) < 1e-6
    e_safe = mx.where(small, 1.0, e)
    return mx.where(small, math.log(hi - lo), e * lo + mx.log(mx.expm1(e_safe * (hi - lo)) / e_safe))


def token_divergence(
    teacher_logits: mx.array | SparseTargets,
    student_logits: mx.array,
    temperature: float = 2.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
) -> mx.array:
    """Per-position T^2-scaled divergence [...] between teacher and student (dense or sparse teacher)."""
    _check(divergence, temperature, beta)
    if isinstance(teacher_logits, SparseTargets):
        logp, logq = _sparse_logprobs(teacher_logits, student_logits, temperature)
    else:
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher logits {teacher_logits.shape} and student logits {student_logits.shape} differ; "
                "use align_vocab_sizes() for padded vocabularies of the same tokenizer"
            )
        t = teacher_logits.astype(mx.float32) / temperature
        s = student_logits.astype(mx.float32) / temperature
        logp = t - mx.logsumexp(t, axis=-1, keepdims=True)
        logq = s - mx.logsumexp(s, axis=-1, keepdims=True)
    # The teacher is a target: no gradient flows into it (matters for on-policy / self-distillation).
    logp = mx.stop_gradient(logp)
    # Every divergence is >= 0; float32 rounding of two near-equal rows can give -1e-8 per token, which
    # T^2 magnifies. Clamp, so a loss is never negative (peers ship "negative JSD" bugs).
    return (temperature**2) * mx.maximum(_divergence_from_logprobs(logp, logq, divergence, beta), 0.0)


# ------------------------------------------------------------------------------------------ public API


def neutralise_masked_rows(teacher: mx.array | SparseTargets, student_logits: mx.array, mask: mx.array):
    """Replace masked rows of both sides by the uniform distribution (logits 0).

    A masked row's divergence is then exactly 0 with a finite gradient. Without this, a padding row whose
    divergence is infinite (e.g. reverse KL where the teacher has a -inf logit the student does not) gives
    0 * inf = NaN in the backward pass even though the row is masked out of the mean.
    """
    keep = mask.astype(mx.bool_)[..., None]
    student_logits = mx.where(keep, student_logits, 0.0)
    if isinstance(teacher, SparseTargets):
        vocab = student_logits.shape[-1]
        return SparseTargets(mx.where(keep, teacher.logits, 0.0), teacher.indices,
                             mx.where(keep[..., 0], teacher.logsumexp, math.log(vocab))), student_logits
    return mx.where(keep, teacher, 0.0), student_logits


def compute_kd_loss(
    teacher_logits: mx.array | SparseTargets,
    student_logits: mx.array,
    temperature: float = 2.0,
    mask: mx.array | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
) -> mx.array:
    """Token-averaged T^2 * divergence(P_teacher^T, P_student^T) over unmasked positions (default forward KL)."""
    if mask is not None:
        teacher_logits, student_logits = neutralise_masked_rows(teacher_logits, student_logits, mask)
    return masked_mean(token_divergence(teacher_logits, student_logits, temperature, divergence, beta), mask)


def token_cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-position cross-entropy -log softmax(logits)[target], float32 (targets must be valid ids)."""
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets.astype(mx.int32)[..., None], axis=-1)[..., 0]
    return mx.logsumexp(logits, axis=-1) - picked


def token_unlikelihood(ce_tok: mx.array) -> mx.array:
    """Per-position unlikelihood -log(1 - p) of a token whose cross-entropy is `ce_tok` (p = exp(-ce)).

    Welleck et al. 2019: pushes a token's probability down, gently while it is small and steeply as it nears
    1 (a confident loop). p is kept below 1 - 1e-6, so a certain token costs 13.8, not inf."""
    p = mx.minimum(mx.exp(-ce_tok), 1.0 - 1e-6)
    return -mx.log1p(-p)


def repeated_ngram_rows(tokens: mx.array, loss_mask: mx.array, n: int = 4) -> mx.array:
    """[B, L-1] bool in `next_token_view`'s layout: row t is true iff token t+1 ends an n-gram that lies in
    the response and already occurred, whole, earlier in the same response: the tokens
    `evaluate.repeated_ngram_share` counts as repeated, i.e. where an answer loops.

    Compares every pair of the row's n-grams ([B, L', L'] booleans, L' = L - n + 1): cheap beside a forward
    pass at chat lengths, and the same shapes every call (it runs inside the compiled step)."""
    B, L = tokens.shape
    m = L - n + 1
    if m < 2:
        return mx.zeros((B, max(L - 1, 0)), mx.bool_)
    resp = loss_mask.astype(mx.bool_)
    inside = resp[:, :m]
    same = tokens[:, :m, None] == tokens[:, None, :m]
    for k in range(1, n):
        inside = inside & resp[:, k : k + m]
        same = same & (tokens[:, k : k + m, None] == tokens[:, None, k : k + m])
    earlier = mx.tril(mx.ones((m, m), mx.bool_), k=-1)  # [i, j]: n-gram j starts before n-gram i
    repeated = (same & earlier & inside[:, None, :]).any(axis=-1) & inside  # [B, m], by n-gram start
    # The n-gram starting at i ends with token i + n - 1, which row i + n - 2 predicts.
    return mx.concatenate([mx.zeros((B, n - 2), mx.bool_), repeated], axis=1)


def loop_rows(tokens: mx.array, loss_mask: mx.array) -> mx.array:
    """`repeated_ngram_rows` of answers only: sequences whose first token is a prompt token. A corpus window
    has no prompt (all of it is scored); it is real text, whose repeats are no loops."""
    return repeated_ngram_rows(tokens, loss_mask) & ~loss_mask[:, :1].astype(mx.bool_)


REPEAT_PENALTY = 20.0


def without_repeats(teacher: mx.array | SparseTargets, targets: mx.array, repeated: mx.array):
    """The teacher's targets with, on the `repeated` rows, the logit of the token that repeats a 4-gram
    lowered by REPEAT_PENALTY (its probability by e^-20; at T = 2, e^-10): the teacher as decoded under a
    no-repeat rule (mlx-lm / HF `no_repeat_ngram_size`), which the student then learns. Sparse targets: when
    the token is among the top-k (a tail token's probability is already small), with the row's logsumexp
    updated to match."""
    if isinstance(teacher, SparseTargets):
        hit = (teacher.indices == targets[..., None]) & repeated[..., None]
        t_y = mx.where(hit, teacher.logits, -mx.inf).max(axis=-1)
        found = hit.any(axis=-1)
        share = mx.where(found, mx.exp(t_y - teacher.logsumexp), 0.0)  # the token's probability, at T = 1
        lse = teacher.logsumexp + mx.log1p(-share * (1.0 - math.exp(-REPEAT_PENALTY)))
        return SparseTargets(teacher.logits - hit * REPEAT_PENALTY, teacher.indices, lse)
    hit = (mx.arange(teacher.shape[-1]) == targets[..., None]) & repeated[..., None]
    return teacher - hit * REPEAT_PENALTY


def compute_ce_loss(logits: mx.array, targets: mx.array, ignore_index: int = IGNORE_INDEX) -> mx.array:
    """Mean token cross-entropy over targets != ignore_index (logits already aligned with targets)."""
    valid = targets != ignore_index
    safe_targets = mx.where(valid, targets, 0)
    return masked_mean(token_cross_entropy(logits, safe_targets), valid)


@dataclass(frozen=True)
class LossSpec:
    """The objective's settings, passed whole to each implementation of it (`kd_objective`,
    `fused.fused_objective`, `cross_vocab.cross_objective`): alpha * T^2 * divergence(teacher_T, student_T)
    + (1 - alpha) * CE (+ unlikelihood * UL on tokens that repeat a 4-gram of their answer, where with
    `no_repeat_teacher` the teacher's target is its no-repeat version). `beta`: JSD's mixing weight;
    `uld_weight`, `uld_top_k`: the sorted-probability term across tokenizers. Checked when made."""

    alpha: float = 0.7
    temperature: float = 2.0
    divergence: str = "forward_kl"
    beta: float = 0.5
    unlikelihood: float = 0.0
    no_repeat_teacher: bool = False
    uld_weight: float = 1.0
    uld_top_k: int = 64

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        _check(self.divergence, self.temperature, self.beta)

    @classmethod
    def of(cls, config) -> LossSpec:
        """The loss settings of a `KDConfig`."""
        return cls(config.alpha, config.temperature, config.divergence, config.jsd_beta, config.unlikelihood,
                   config.no_repeat_teacher, config.uld_weight, config.uld_top_k)

    @property
    def loop_terms(self) -> bool:
        return self.unlikelihood > 0 or self.no_repeat_teacher


DEFAULT_LOSS = LossSpec()


def kd_objective(
    student_logits: mx.array,
    teacher_logits: mx.array | SparseTargets,
    tokens: mx.array,
    loss_mask: mx.array,
    spec: LossSpec = DEFAULT_LOSS,
) -> dict[str, mx.array]:
    """The combined objective alpha * KD + (1 - alpha) * CE (+ unlikelihood * UL) on the response tokens.

    `student_logits` [B, L, V] and the teacher's targets come from forward passes over `tokens` [B, L];
    `loss_mask` [B, L] marks response tokens. The teacher may be dense [B, L, V] or `SparseTargets` over
    [B, L, k]. UL is the sum of `token_unlikelihood` over the tokens that repeat a 4-gram of their answer
    (`loop_rows`), divided by the number of response tokens like the other parts; `no_repeat_teacher`: on
    those tokens the teacher's target is `without_repeats` and CE is skipped. Returns {"loss",
    "kd", "ce", "ul", "ntokens"}: the parts are returned so that each can be logged. A part whose weight is 0
    is not computed (alpha = 1 needs no CE, alpha = 0 needs no teacher).
    """
    alpha, unlikelihood, no_repeat_teacher = spec.alpha, spec.unlikelihood, spec.no_repeat_teacher
    s_logits, targets, mask = next_token_view(student_logits, tokens, loss_mask)
    n = mask.astype(mx.float32).sum()
    zero = mx.array(0.0)
    repeated = loop_rows(tokens, loss_mask) & mask if spec.loop_terms else None
    ce_tok = token_cross_entropy(s_logits, targets) if alpha < 1.0 or unlikelihood > 0 else None
    ce_mask = mask & ~repeated if no_repeat_teacher else mask  # a loop's token is no text to imitate
    ce = masked_mean(mx.where(ce_mask, ce_tok, 0.0), mask) if alpha < 1.0 else zero
    ul = zero
    if unlikelihood > 0:
        ul = mx.where(repeated, token_unlikelihood(ce_tok), 0.0).sum() / mx.maximum(n, 1.0)
    kd = zero
    if alpha > 0.0:
        if isinstance(teacher_logits, SparseTargets):
            t = SparseTargets(*(x[:, :-1] for x in teacher_logits))
        else:
            t = teacher_logits[:, :-1]
        if no_repeat_teacher:
            t = without_repeats(t, targets, repeated)
        kd = compute_kd_loss(t, s_logits, spec.temperature, mask, spec.divergence, spec.beta)
    return {"loss": alpha * kd + (1.0 - alpha) * ce + unlikelihood * ul, "kd": kd, "ce": ce, "ul": ul, "ntokens": n}


def topk_targets(teacher_logits: mx.array, k: int) -> SparseTargets:
    """Compress dense teacher logits [..., V] to `SparseTargets` of the k largest raw logits."""
    logits = teacher_logits.astype(mx.float32)
    k = min(k, logits.shape[-1])
    idx = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]
    top = mx.take_along_axis(logits, idx, axis=-1)
    # Sort each row by logit, largest first: deterministic layout for caches and easy inspection.
    order = mx.argsort(-top, axis=-1)
    return SparseTargets(
        mx.take_along_axis(top, order, axis=-1),
        mx.take_along_axis(idx, order, axis=-1).astype(mx.int32),
        mx.logsumexp(logits, axis=-1),
    )
