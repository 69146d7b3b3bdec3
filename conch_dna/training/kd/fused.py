"""A chunked KD + CE loss that never materialises [batch, seq, vocab] logits.

The principal cost of logit distillation is the full-vocabulary logits of two models (151936 x 4 bytes
per token each for Qwen). Here the loss takes the models' final *hidden states* and their output heads:

    for each chunk of C token positions:
        s = student_head(h_s[chunk]); t = teacher_head(h_t[chunk])  (or cached top-k targets)
        loss_c, dL/dh_s[chunk] = value_and_grad(weighted per-token loss of (s, t, y))
        -> keep the scalar and the [C, D] gradient; the [C, V] logits die with the chunk

and returns the total together with dL/dh_s. A custom VJP (`mx.custom_function`) hands that gradient to the
student's backward pass, so the student's forward runs once and its backward once: no surrogate loss and no
recomputed forward. At most one chunk of logits exists at a time, so peak memory grows with the chunk size,
not with sequence length x vocabulary.

The per-chunk loss is `losses.token_divergence` / `losses.token_cross_entropy` themselves, differentiated
by MLX inside the chunk: every divergence, masks, sparse top-k targets, tied or untied and quantized heads
give the same values and gradients as the reference (tests/test_fused.py checks <= 1e-4 relative).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from conch_dna.training.kd import kernels
from conch_dna.training.kd.losses import (
    DEFAULT_LOSS,
    REPEAT_PENALTY,
    LossSpec,
    SparseTargets,
    _warn_if_empty,
    loop_rows,
    neutralise_masked_rows,
    token_cross_entropy,
    token_divergence,
    token_unlikelihood,
    without_repeats,
)

Head = Callable[[mx.array], mx.array]


def model_parts(model) -> tuple[Callable, Head]:
    """(body, head) of an mlx-lm causal LM: body(tokens) -> final normed hidden states, head(h) -> logits.

    Works for models whose `Model.__call__` is `head(self.model(tokens))` (llama, qwen2, qwen3, mistral,
    gemma3_text, phi3, ...). Models with extra logit processing (soft-capping, scaling) are detected by
    comparing against the full forward in `check_parts` and should use the reference loss instead.
    """
    body = model.model
    head = model.lm_head if getattr(model, "lm_head", None) is not None else model.model.embed_tokens.as_linear
    return body, head


def teacher_hidden(body: Callable, tokens: mx.array, max_tokens: int, wait: bool = True) -> mx.array:
    """The teacher's final hidden states [B, L, D], made from groups of whole rows of at most `max_tokens`
    tokens (at least one row), at most two groups in flight. Rows are independent (causal attention within a
    row), so the states are those of one pass, and the forward pass's transient memory is that of two
    groups: a whole 8 x 1024 batch through Qwen2.5-1.5B held 10 GB above the weights on an H100.

    `wait=False` (teacher prefetch): one pass, launched with `mx.async_eval` and returned while it runs, so
    the caller can queue the student's step beside it; its memory is then bounded by MLX's memory limit."""
    if not wait:
        h = mx.stop_gradient(body(tokens))
        mx.async_eval(h)
        return h
    rows = max(1, max_tokens // max(1, tokens.shape[1]))
    parts = []
    for start in range(0, tokens.shape[0], rows):
        h = mx.stop_gradient(body(tokens[start : start + rows]))
        mx.async_eval(h)  # runs while Python builds the next group's graph ...
        if parts:
            mx.eval(parts[-1])  # ... but at most two groups are in flight
        parts.append(h)
    mx.eval(parts[-1])
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)


class TeacherStates(NamedTuple):
    """The teacher's final hidden states [B, L, Dt] and its output head: logits are made chunk by chunk."""

    hidden: mx.array
    head: Head


def parts_match(model, vocab_size: int | None = None) -> bool:
    """True when head(body(tokens)) reproduces model(tokens), i.e. the fused path is exact for this model."""
    body, head = model_parts(model)
    x = mx.array([[1, 2, 3, 4]])
    try:
        return bool(mx.allclose(head(body(x)), model(x), rtol=1e-4, atol=1e-4).item())
    except Exception:  # noqa: BLE001 - any architecture that does not split this way
        return False


class Rows(NamedTuple):
    """The scored rows of a fused loss: the token each row predicts [N], whether it counts [N], and (for the
    loop terms) whether it repeats a 4-gram of its answer [N] (`losses.loop_rows`)."""

    targets: mx.array
    mask: mx.array
    repeated: mx.array | None = None


class Chunking(NamedTuple):
    """How a fused loss walks its rows: `size` rows per chunk; `fast`: the closed-form chunk where it applies;
    `compiled`: the caller traces the step under `mx.compile` (no NumPy chunk, no row selection)."""

    size: int = 1024
    fast: bool = True
    compiled: bool = False


DEFAULT_CHUNKING = Chunking()


def _chunk_loss(s_logits, t, targets, weights, spec: LossSpec):
    """sum over the chunk of w_kd * KD_token + w_ce * CE_token + w_ul * UL_token (`weights` = (w_kd, w_ce,
    w_ul, no_repeat); they fold in the masks and 1/n); `no_repeat`: the chunk's repeated rows, where the
    teacher's target is `without_repeats`."""
    w_kd, w_ce, w_ul, no_repeat = weights
    total = mx.array(0.0)
    kd_sum = ce_sum = ul_sum = mx.array(0.0)
    if no_repeat is not None:
        t = without_repeats(t, targets, no_repeat)
    # where, not multiply: a masked (padding) row may be inf, and inf * 0 = NaN.
    if w_kd is not None:
        t, s_kd = neutralise_masked_rows(t, s_logits, w_kd > 0)
        kd_tok = token_divergence(t, s_kd, spec.temperature, spec.divergence, spec.beta)
        kd_sum = mx.where(w_kd > 0, kd_tok * w_kd, 0.0).sum()
        total = total + kd_sum
    ce_tok = token_cross_entropy(s_logits, targets) if w_ce is not None or w_ul is not None else None
    if w_ce is not None:
        ce_sum = mx.where(w_ce > 0, ce_tok * w_ce, 0.0).sum()
        total = total + ce_sum
    if w_ul is not None:
        ul_sum = mx.where(w_ul > 0, token_unlikelihood(ce_tok) * w_ul, 0.0).sum()
        total = total + ul_sum
    return total, (kd_sum, ce_sum, ul_sum)


def _autograd_chunk(head, hs, t, y, weights, spec: LossSpec):
    """(total, kd, ce, ul, dL/dhs) of one chunk, differentiated by MLX: every divergence and target kind."""
    def f(h):
        return _chunk_loss(head(h), t, y, weights, spec)

    (total, (kd, ce, ul)), g = mx.value_and_grad(f)(hs)
    return total, kd, ce, ul, g


def fused_kd_loss(h_student: mx.array, student_head: Head, teacher: TeacherStates | SparseTargets, rows: Rows,
                  spec: LossSpec = DEFAULT_LOSS, chunking: Chunking = DEFAULT_CHUNKING) -> dict[str, mx.array]:
    """alpha * KD + (1 - alpha) * CE (+ unlikelihood * UL on the repeated rows) over the scored rows, from
    hidden states, chunk by chunk.

    h_student [N, D]: the student's final hidden states for the N scored positions (already shifted: row i
    predicts rows.targets[i]). `teacher` is either the teacher's hidden states [N, Dt] with its head
    (`TeacherStates`) or `SparseTargets` [N, k]. Differentiable w.r.t. h_student only (the teacher is a
    target). Returns {"loss", "kd", "ce", "ul", "ntokens"} like `losses.kd_objective`.
    """
    if spec.loop_terms and rows.repeated is None:
        raise ValueError("unlikelihood > 0 and no_repeat_teacher need the repeated rows (losses.loop_rows)")
    n, *weights = _row_weights(rows, spec)
    chunk_fn = _chunk_function(student_head, teacher, rows, weights, spec, chunking)
    teacher_arrays = (teacher.hidden,) if isinstance(teacher, TeacherStates) else tuple(teacher)

    @mx.custom_function
    def loss_fn(h_s, *t_arrays):
        return _chained_chunks(h_s, t_arrays, chunk_fn, chunking.size)

    @loss_fn.vjp
    def loss_vjp(primals, cotangents, outputs):
        # d(loss)/d(h_s) was computed in the forward pass; the teacher receives no gradient.
        g = outputs[4] * cotangents[0].astype(outputs[4].dtype)
        return (g.astype(primals[0].dtype),) + tuple(mx.zeros_like(p) for p in primals[1:])

    loss, kd_w, ce_w, ul_w, _ = loss_fn(h_student, *teacher_arrays)
    # The parts carry their weights; report them unweighted, as kd_objective does.
    kd = kd_w / spec.alpha if spec.alpha > 0 else mx.array(0.0)
    ce = ce_w / (1.0 - spec.alpha) if spec.alpha < 1 else mx.array(0.0)
    ul = ul_w / spec.unlikelihood if spec.unlikelihood > 0 else mx.array(0.0)
    return {"loss": loss, "kd": mx.stop_gradient(kd), "ce": mx.stop_gradient(ce), "ul": mx.stop_gradient(ul),
            "ntokens": n}


def _chunk_function(student_head, teacher, rows: Rows, weights: list, spec: LossSpec, chunking: Chunking):
    """chunk(hs, teacher arrays, row slice) -> (total, kd, ce, ul, dL/dhs): the closed-form chunk for the default
    objective (dense teacher, forward KL + CE, plain output matrices), MLX's autograd for every other."""
    w_student = _head_weight(student_head) if chunking.fast else None
    w_teacher = _head_weight(teacher.head) if chunking.fast and isinstance(teacher, TeacherStates) else None
    w_kd, w_ce, w_ul, no_repeat = weights
    if w_student is not None and w_teacher is not None and spec.divergence == "forward_kl":
        # Compiled, its elementwise passes over [C, V] fuse into few kernels. Its weights are arrays even
        # where a part is off (a compiled chunk takes arrays only).
        loops = w_ul is not None or no_repeat is not None
        fast_chunk = _fast_forward_kl_ce(w_student, w_teacher, spec.temperature, traced=chunking.compiled, loops=loops)
        zeros = mx.zeros(rows.mask.shape, mx.float32)
        fast_w = [zeros if w is None else w for w in (w_kd, w_ce)]
        if loops:
            fast_w += [zeros if w_ul is None else w_ul, zeros > 0 if no_repeat is None else no_repeat]

        def fast(hs, t_arrays, sl):
            return fast_chunk(hs, mx.stop_gradient(t_arrays[0][sl]), rows.targets[sl], *(w[sl] for w in fast_w))

        return fast

    def general(hs, t_arrays, sl):
        if isinstance(teacher, TeacherStates):
            t = mx.stop_gradient(teacher.head(t_arrays[0][sl]))
        else:
            t = SparseTargets(*(x[sl] for x in t_arrays))
        return _autograd_chunk(student_head, hs, t, rows.targets[sl], [None if w is None else w[sl] for w in weights], spec)

    return general


def _chained_chunks(h_s, t_arrays, chunk_fn, chunk_size: int):
    """(loss, kd, ce, ul, dL/dh_s) summed over the chunks of rows, each chunk's [C, V] logits freed before
    the next chunk's exist."""
    n_rows = h_s.shape[0]
    totals, kds, ces, uls, grads = [], [], [], [], []
    after = None  # a zero that depends on the previous chunk's results
    for start in range(0, n_rows, chunk_size):
        sl = slice(start, min(start + chunk_size, n_rows))
        hs = h_s[sl]
        if after is not None:
            hs = hs + after.astype(hs.dtype)
        total, kd, ce, ul, g = chunk_fn(hs, t_arrays, sl)
        # Chain the chunks: chunk i+1 cannot start before chunk i's gradient exists, so MLX's scheduler
        # runs them one after another and each [C, V] buffer is freed before the next is allocated.
        # (Evaluating each chunk eagerly would not free them: inside a grad transform every evaluated
        # array keeps its graph.) where(x == x, 0, 0) is an exact zero even for inf/NaN.
        after = mx.stop_gradient(mx.where(g[:1, :1] == g[:1, :1], 0.0, 0.0)[0, 0])
        totals.append(total)
        kds.append(kd)
        ces.append(ce)
        uls.append(ul)
        grads.append(g)
    loss = mx.stack(totals).sum()
    grad_h = mx.concatenate(grads, axis=0) if grads else mx.zeros_like(h_s)
    return loss, mx.stack(kds).sum(), mx.stack(ces).sum(), mx.stack(uls).sum(), grad_h


def _row_weights(rows: Rows, spec: LossSpec):
    """(n, w_kd, w_ce, w_ul, no_repeat): the scored rows' count and each part's per-row weight (mask, alpha
    and 1/n folded in; None where a part is off), and the loop rows that get the no-repeat teacher."""
    alpha, mask = spec.alpha, rows.mask
    maskf = mask.astype(mx.float32)
    n = maskf.sum()
    _warn_if_empty(n)
    inv_n = 1.0 / mx.maximum(n, 1.0)
    w_kd = maskf * (alpha * inv_n) if alpha > 0 else None
    w_ce = maskf * ((1.0 - alpha) * inv_n) if alpha < 1 else None
    w_ul = no_repeat = None
    if spec.loop_terms:
        repeated = rows.repeated & mask
        if spec.unlikelihood > 0:
            w_ul = repeated.astype(mx.float32) * (spec.unlikelihood * inv_n)
        if spec.no_repeat_teacher:
            no_repeat = repeated
            if w_ce is not None:  # a loop's token is no text to imitate
                w_ce = mx.where(repeated, 0.0, w_ce)
    return n, w_kd, w_ce, w_ul, no_repeat


def _head_weight(head: Head | None) -> mx.array | None:
    """The [V, D] matrix of a plain (unquantized, bias-free) output head, or None."""
    import mlx.nn as nn

    owner = getattr(head, "__self__", head)  # embed_tokens.as_linear is a bound method
    if isinstance(owner, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return None
    if isinstance(owner, nn.Linear) and "bias" not in owner:
        return owner.weight
    if isinstance(owner, nn.Embedding) and getattr(head, "__name__", "") == "as_linear":
        return owner.weight
    return None


def _fast_forward_kl_ce(w_s: mx.array, w_t: mx.array, temperature: float, traced: bool = False, loops: bool = False):
    """A compiled chunk: loss parts and dL/dh for forward KL + CE with closed-form logit gradients.

    d(T^2 KL(p||q))/ds = T (q - p) with p, q the tempered softmaxes; d CE/ds = softmax(s) - onehot(y).
    On an NVIDIA GPU the elementwise middle is one custom kernel, on the CPU NumPy (`kernels.py`); on Apple
    silicon's GPU it is compiled MLX. `traced`: the caller compiles the whole step (no NumPy, no nested
    compile). chunk(hs, ht, y, wk, wc[, wu, no_repeat]) -> (total, kd, ce, ul, dL/dh); the weights fold in
    the mask, alpha and 1/n.

    `loops` (the loop terms: `losses.without_repeats` on the `no_repeat` rows, unlikelihood weights `wu`):
    UL's gradient -log(1 - p_y) is c (onehot(y) - softmax(s)) with c = p_y / (1 - p_y), i.e. CE's with the
    weight -c; so a row's CE weight becomes wc - wu c, and the closed form stays exact. The CUDA kernel takes
    no loop terms: with them, the compiled MLX chunk runs there.
    """
    T = float(temperature)
    if kernels.available() and not loops:
        return _kernel_chunk(w_s, w_t, T)
    if not traced and kernels.numpy_available():
        return _numpy_chunk(w_s, w_t, T)
    # Under an outer mx.compile (`traced`) the chunk is fused there. A nested compiled function would be
    # freed from inside the outer one's cache and abort MLX 0.32 ("Resource deadlock avoided").
    chunk = _mlx_chunk(w_s, w_t, T)
    return chunk if traced else mx.compile(chunk)


def _ul_parts(ce_tok, wu, xp):
    """(-log(1 - p), c) per row from CE = -log p, clamped as `losses.token_unlikelihood` (c = 0 there)."""
    p = xp.exp(-ce_tok)
    live = p < 1.0 - 1e-6
    p = xp.minimum(p, 1.0 - 1e-6)
    return -xp.log1p(-p), xp.where(live, p / (1.0 - p), 0.0) * wu


def _kernel_chunk(w_s: mx.array, w_t: mx.array, T: float):
    """The chunk through the CUDA kernel (`kernels.forward_kl_ce_rows`): no loop terms."""
    def kernel_chunk(hs, ht, y, wk, wc):
        s = hs @ w_s.T
        t = ht @ w_t.T
        g_s, kd_tok, ce_tok = kernels.forward_kl_ce_rows(s, t, y, wk, wc, T)
        g_h = g_s.astype(hs.dtype) @ w_s
        kd = mx.where(wk > 0, kd_tok * wk, 0.0).sum()
        ce = mx.where(wc > 0, ce_tok * wc, 0.0).sum()
        return kd + ce, kd, ce, mx.array(0.0), g_h

    return kernel_chunk


def _numpy_chunk(w_s: mx.array, w_t: mx.array, T: float):
    """The chunk with its elementwise middle in NumPy (the CPU: MLX's CPU `exp` is scalar there)."""
    def numpy_chunk(hs, ht, y, wk, wc, wu=None, no_repeat=None):
        s, t = np.array((hs @ w_s.T).astype(mx.float32)), np.array((ht @ w_t.T).astype(mx.float32))
        y, wk, wc = np.asarray(y), np.asarray(wk), np.asarray(wc)
        ul_tok = None
        if no_repeat is not None:
            r = np.flatnonzero(np.asarray(no_repeat))
            t[r, y[r]] -= REPEAT_PENALTY
        if wu is not None:
            wu = np.asarray(wu)
            r = np.flatnonzero(wu > 0)
            sr = s[r]
            top = sr.max(axis=-1)
            ce_r = top + np.log(np.exp(sr - top[:, None]).sum(axis=-1)) - sr[np.arange(r.size), y[r]]
            ul_tok, c = _ul_parts(ce_r, wu[r], np)
            ul_sum = float((ul_tok * wu[r]).sum())
            wc_grad = wc.copy()
            wc_grad[r] -= c
        g_s, kd_tok, ce_tok = kernels.forward_kl_ce_rows_numpy(s, t, y, wk, wc if ul_tok is None else wc_grad, T)
        g_h = mx.array(g_s).astype(hs.dtype) @ w_s
        kd = mx.array(float(np.where(wk > 0, kd_tok * wk, 0.0).sum()))
        ce = mx.array(float(np.where(wc > 0, ce_tok * wc, 0.0).sum()))
        ul = mx.array(ul_sum if ul_tok is not None else 0.0)
        mx.eval(g_h)  # now, so that this chunk's [C, V] gradient is freed before the next chunk
        return kd + ce + ul, kd, ce, ul, g_h

    return numpy_chunk


def _mlx_chunk(w_s: mx.array, w_t: mx.array, T: float):
    """The chunk in MLX operations (compiled by the caller): every device, loop terms included."""
    def chunk(hs, ht, y, wk, wc, wu=None, no_repeat=None):
        s = (hs @ w_s.T).astype(mx.float32)
        t = (ht @ w_t.T).astype(mx.float32)
        onehot = mx.arange(s.shape[-1])[None, :] == y[:, None]
        if no_repeat is not None:
            t = t - (onehot & no_repeat[:, None]) * REPEAT_PENALTY
        logq = s / T - mx.logsumexp(s / T, axis=-1, keepdims=True)
        logp = t / T - mx.logsumexp(t / T, axis=-1, keepdims=True)
        p, q = mx.exp(logp), mx.exp(logq)
        kd_tok = (T * T) * mx.maximum((p * (logp - logq)).sum(axis=-1), 0.0)
        lse = mx.logsumexp(s, axis=-1, keepdims=True)
        ce_tok = lse[:, 0] - mx.take_along_axis(s, y[:, None], axis=-1)[:, 0]
        ul = mx.array(0.0)
        wc_grad = wc
        if wu is not None:
            ul_tok, c = _ul_parts(ce_tok, wu, mx)
            ul = mx.where(wu > 0, ul_tok * wu, 0.0).sum()
            wc_grad = wc - c
        g_s = wk[:, None] * (T * (q - p)) + wc_grad[:, None] * (mx.exp(s - lse) - onehot)
        g_h = g_s.astype(hs.dtype) @ w_s
        kd = mx.where(wk > 0, kd_tok * wk, 0.0).sum()
        ce = mx.where(wc > 0, ce_tok * wc, 0.0).sum()
        return kd + ce + ul, kd, ce, ul, g_h

    return chunk


def fused_objective(student, teacher, tokens: mx.array, loss_mask: mx.array, spec: LossSpec = DEFAULT_LOSS,
                    chunking: Chunking = DEFAULT_CHUNKING, logits_width: int | None = None) -> dict[str, mx.array]:
    """`kd_objective`'s drop-in: runs the student to its final hidden states only.

    `teacher`: `SparseTargets` [B, L, k] (cached), `TeacherStates` (online: the teacher's hidden states and
    head), or a teacher model, run here to its hidden states. Shift and mask follow `losses.next_token_view`:
    row t predicts token t+1. `logits_width`: the width logits are cut to (the real vocabulary of a padded head).
    """
    body, head = model_parts(student)
    head = _logits_up_to(head, logits_width)
    h = body(tokens)[:, :-1]
    B, L1, D = h.shape
    targets = tokens[:, 1:].reshape(-1)
    mask = loss_mask[:, 1:].reshape(-1)
    if not isinstance(teacher, TeacherStates | SparseTargets):
        t_body, t_head = model_parts(teacher)
        teacher = TeacherStates(mx.stop_gradient(t_body(tokens)), t_head)
    # Only the scored rows go through the output heads: prompts and padding are about half of a chat batch,
    # and the heads are most of the loss's cost. Not when compiled: the row count would change the shapes.
    picked = None if chunking.compiled else scored_rows(mask)
    pick = (lambda x: x) if picked is None else (lambda x: x[picked])
    repeated = pick(loop_rows(tokens, loss_mask).reshape(-1)) if spec.loop_terms else None
    rows = Rows(pick(targets), pick(mask), repeated)
    h = pick(h.reshape(B * L1, D))
    if isinstance(teacher, TeacherStates):
        teacher = TeacherStates(pick(teacher.hidden[:, :-1].reshape(B * L1, -1)), _logits_up_to(teacher.head, logits_width))
    else:
        teacher = SparseTargets(*(pick(x[:, :-1].reshape(B * L1, *x.shape[2:])) for x in teacher))
    return fused_kd_loss(h, head, teacher, rows, spec, chunking)


def scored_rows(mask: mx.array) -> mx.array | None:
    """Indices of the true entries of a flat mask, or None when all (or none) are true."""
    keep = np.flatnonzero(np.array(mask))
    return mx.array(keep.astype(np.int32)) if 0 < keep.size < mask.size else None


def _logits_up_to(head: Head, logits_width: int | None) -> Head:
    """Cut logits to the real vocabulary when the embedding matrix is padded wider."""
    if logits_width is None:
        return head
    return lambda h: head(h)[..., :logits_width]
