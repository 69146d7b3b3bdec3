"""KD math against an independent float64 NumPy reference (values and gradients), plus properties.

Relative error is measured norm-wise, ||x - ref|| / ||ref||, so that entries near zero do not dominate.
Reference gradients are central finite differences of the float64 reference: independent of MLX autograd.
"""

import warnings
import zlib

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import conch_dna  # noqa: F401  (BLAS preload before mlx)
from conch_dna.training.kd import (
    DIVERGENCES,
    SparseTargets,
    compute_ce_loss,
    compute_kd_loss,
    kd_objective,
    topk_targets,
)
from conch_dna.training.kd.losses import LossSpec

TOL = 1e-5
TEMPERATURES = (0.5, 1.0, 2.0, 10.0)


# ------------------------------------------------------------------------------- float64 reference


def _log_softmax(x):
    m = np.max(np.where(np.isfinite(x), x, -np.inf), axis=-1, keepdims=True)
    e = np.exp(x - m)
    return x - m - np.log(e.sum(-1, keepdims=True))


def _kl(logp, logq):
    p = np.exp(logp)
    with np.errstate(invalid="ignore"):
        return np.where(p > 0, p * (logp - logq), 0.0).sum(-1)


def ref_divergence(t, s, T, div, beta=0.5):
    logp, logq = _log_softmax(t / T), _log_softmax(s / T)
    if div == "jsd" and beta == 0.0:
        div = "forward_kl"
    if div == "jsd" and beta == 1.0:
        div = "reverse_kl"
    if div == "forward_kl":
        d = _kl(logp, logq)
    elif div == "reverse_kl":
        d = _kl(logq, logp)
    elif div == "jsd":
        m = beta * np.exp(logp) + (1 - beta) * np.exp(logq)
        with np.errstate(divide="ignore"):
            logm = np.log(m)
        d = beta * _kl(logp, logm) + (1 - beta) * _kl(logq, logm)
    else:
        d = 0.5 * np.abs(np.exp(logp) - np.exp(logq)).sum(-1)
    return T * T * d


def ref_masked_mean(v, mask):
    return (v * mask).sum() / max(mask.sum(), 1)


def ref_ce(logits, targets):
    return -np.take_along_axis(_log_softmax(logits), targets[..., None], -1)[..., 0]


def ref_objective(s, t, tokens, loss_mask, alpha, T, div, beta=0.5):
    s, t, y, m = s[:, :-1], t[:, :-1], tokens[:, 1:], loss_mask[:, 1:].astype(np.float64)
    kd = ref_masked_mean(ref_divergence(t, s, T, div, beta), m)
    ce = ref_masked_mean(ref_ce(s, y), m)
    return alpha * kd + (1 - alpha) * ce


def fd_grad(f, x, h=1e-5):
    """Central finite differences of scalar f at float64 x; -inf entries get gradient 0."""
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        if not np.isfinite(x[i]):
            continue
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        g[i] = (f(xp) - f(xm)) / (2 * h)
    return g


def rel_err(a, ref):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    denom = np.linalg.norm(ref)
    return np.linalg.norm(a - ref) / (denom if denom > 0 else 1.0)


def make_inputs(seed, B=2, L=6, V=7, scale=3.0, neg_inf=False):
    rng = np.random.default_rng(seed)
    t = rng.normal(size=(B, L, V)) * scale
    s = rng.normal(size=(B, L, V)) * scale
    if neg_inf:
        t[..., -1] = -np.inf  # a masked vocabulary entry, in both models
        s[..., -1] = -np.inf
    # The reference sees exactly the float32 values MLX sees: only the computation differs.
    return t.astype(np.float32).astype(np.float64), s.astype(np.float32).astype(np.float64)


# --------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("T", TEMPERATURES)
@pytest.mark.parametrize("neg_inf", [False, True])
def test_kd_loss_matches_float64_reference(div, T, neg_inf):
    # A seed per case that is the same in every process (hash() of a str is salted per process: PYTHONHASHSEED).
    t, s = make_inputs(zlib.crc32(f"{div}/{T}/{neg_inf}".encode()) % 1000, neg_inf=neg_inf)
    # Ragged lengths: sequence 0 has 6 valid positions, sequence 1 has 3.
    mask = np.ones(t.shape[:2], bool)
    mask[1, 3:] = False
    beta = 0.3 if div == "jsd" else 0.5

    def f_ref(s_):
        return ref_masked_mean(ref_divergence(t, s_, T, div, beta), mask.astype(np.float64))

    def f_mx(s_):
        return compute_kd_loss(mx.array(t.astype(np.float32)), s_, T, mx.array(mask), divergence=div, beta=beta)

    s32 = mx.array(s.astype(np.float32))
    val, grad = mx.value_and_grad(f_mx)(s32)
    assert not np.isnan(np.array(grad)).any()
    assert rel_err(val.item(), f_ref(s)) <= TOL
    assert rel_err(np.array(grad), fd_grad(f_ref, s)) <= TOL


def test_forward_kl_gradient_is_T_times_difference_of_softmaxes():
    t, s = make_inputs(1)
    T = 2.0
    n = t.shape[0] * t.shape[1]
    grad = mx.grad(lambda s_: compute_kd_loss(mx.array(t, mx.float32), s_, T))(mx.array(s, mx.float32))
    analytic = T * (np.exp(_log_softmax(s / T)) - np.exp(_log_softmax(t / T))) / n
    assert rel_err(np.array(grad), analytic) <= TOL


def test_teacher_only_neg_inf_is_finite_for_forward_kl_and_jsd():
    t, s = make_inputs(2)
    t[..., 0] = -np.inf  # the teacher never produces token 0; the student does
    for div in ("forward_kl", "jsd", "tvd"):
        val, grad = mx.value_and_grad(lambda s_, d=div: compute_kd_loss(mx.array(t, mx.float32), s_, 2.0, divergence=d))(
            mx.array(s, mx.float32)
        )
        assert np.isfinite(val.item()) and np.isfinite(np.array(grad)).all()
        assert rel_err(val.item(), ref_divergence(t, s, 2.0, div).mean()) <= TOL


def test_bf16_inputs_are_computed_in_float32():
    t, s = make_inputs(3)
    tb, sb = mx.array(t, mx.bfloat16), mx.array(s, mx.bfloat16)
    t_r, s_r = np.array(tb.astype(mx.float32), np.float64), np.array(sb.astype(mx.float32), np.float64)
    for div in DIVERGENCES:
        val = compute_kd_loss(tb, sb, 2.0, divergence=div)
        assert val.dtype == mx.float32
        assert rel_err(val.item(), ref_divergence(t_r, s_r, 2.0, div).mean()) <= TOL
    y = mx.array(np.random.default_rng(0).integers(0, 7, size=t.shape[:2]))
    assert rel_err(compute_ce_loss(sb, y).item(), ref_ce(s_r, np.array(y)).mean()) <= TOL


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("T", TEMPERATURES)
def test_objective_matches_reference_with_shift_and_mask(alpha, T):
    rng = np.random.default_rng(int(alpha * 10 + T * 100))
    B, L, V = 2, 7, 6
    t, s = (np.float64(np.float32(rng.normal(size=(B, L, V)) * 2)) for _ in range(2))
    tokens = rng.integers(0, V, size=(B, L))
    loss_mask = np.zeros((B, L), bool)
    loss_mask[0, 3:] = True  # prompt of 3 tokens, response of 4
    loss_mask[1, 2:5] = True  # prompt of 2, response of 3, then 2 padding tokens

    def f_mx(s_):
        out = kd_objective(s_, mx.array(t, mx.float32), mx.array(tokens), mx.array(loss_mask), LossSpec(alpha, T))
        return out["loss"], out

    (val, out), grad = mx.value_and_grad(f_mx)(mx.array(s, mx.float32))
    f_ref = lambda s_: ref_objective(s_, t, tokens, loss_mask, alpha, T, "forward_kl")  # noqa: E731
    assert rel_err(val.item(), f_ref(s)) <= TOL
    assert rel_err(np.array(grad), fd_grad(f_ref, s)) <= TOL
    assert out["ntokens"].item() == loss_mask[:, 1:].sum()
    m = loss_mask[:, 1:].astype(np.float64)
    if alpha > 0:
        assert rel_err(out["kd"].item(), ref_masked_mean(ref_divergence(t[:, :-1], s[:, :-1], T, "forward_kl"), m)) <= TOL
    if alpha < 1:
        assert rel_err(out["ce"].item(), ref_masked_mean(ref_ce(s[:, :-1], tokens[:, 1:]), m)) <= TOL


def test_ce_ignore_index_and_token_weighting():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(2, 5, 9))
    y = rng.integers(0, 9, size=(2, 5))
    y[0, 1:] = -100  # sequence 0 contributes one token, sequence 1 five: token-weighted, not mean of means
    val = compute_ce_loss(mx.array(logits, mx.float32), mx.array(y))
    keep = y != -100
    expected = ref_ce(logits, np.where(keep, y, 0))[keep].mean()
    assert rel_err(val.item(), expected) <= TOL


def test_prompt_and_padding_tokens_change_nothing():
    rng = np.random.default_rng(7)
    B, L, V = 2, 8, 10
    t, s = rng.normal(size=(B, L, V)), rng.normal(size=(B, L, V))
    tokens = rng.integers(0, V, size=(B, L))
    loss_mask = np.zeros((B, L), bool)
    loss_mask[0, 4:] = True
    loss_mask[1, 3:6] = True
    # Positions whose prediction is not scored: t where loss_mask[t+1] is false (and the last position).
    unscored = np.ones((B, L), bool)
    unscored[:, :-1] = ~loss_mask[:, 1:]

    def run(t_, s_, tok):
        f = lambda x: kd_objective(x, mx.array(t_, mx.float32), mx.array(tok), mx.array(loss_mask), LossSpec(0.5, 2.0))["loss"]  # noqa: E731
        v, g = mx.value_and_grad(f)(mx.array(s_, mx.float32))
        return v.item(), np.array(g)

    v0, g0 = run(t, s, tokens)
    t2, s2, tok2 = t.copy(), s.copy(), tokens.copy()
    t2[unscored] = rng.normal(size=(unscored.sum(), V)) * 10
    s2[unscored] = rng.normal(size=(unscored.sum(), V)) * 10
    tok2[~loss_mask] = rng.integers(0, V, size=(~loss_mask).sum())  # prompt and padding token ids
    v1, g1 = run(t2, s2, tok2)
    assert v0 == pytest.approx(v1, rel=1e-6)
    assert np.allclose(g0[~unscored], g1[~unscored], rtol=1e-5, atol=1e-7)
    assert np.all(g1[unscored] == 0)


def test_all_masked_batch_is_zero_with_warning():
    t, s = make_inputs(8)
    mask = mx.zeros(t.shape[:2], dtype=mx.bool_)
    with pytest.warns(RuntimeWarning, match="masked"):
        val, grad = mx.value_and_grad(lambda x: compute_kd_loss(mx.array(t, mx.float32), x, 2.0, mask))(mx.array(s, mx.float32))
    assert val.item() == 0.0 and not np.isnan(np.array(grad)).any()


def test_bad_arguments_are_rejected():
    t = mx.zeros((1, 2, 4))
    with pytest.raises(ValueError, match="unknown divergence"):
        compute_kd_loss(t, t, divergence="kl")
    with pytest.raises(ValueError, match="beta"):
        compute_kd_loss(t, t, divergence="jsd", beta=1.5)
    with pytest.raises(ValueError, match="differ"):
        compute_kd_loss(t, mx.zeros((1, 2, 5)))
    with pytest.raises(ValueError, match="alpha"):
        kd_objective(t, t, mx.zeros((1, 2), mx.int32), mx.ones((1, 2)), LossSpec(alpha=1.2))


# ------------------------------------------------------------------------------------- JSD limits


def test_jsd_end_points_are_forward_and_reverse_kl():
    t, s = (mx.array(x, mx.float32) for x in make_inputs(9))
    fwd = compute_kd_loss(t, s, 2.0, divergence="forward_kl").item()
    rev = compute_kd_loss(t, s, 2.0, divergence="reverse_kl").item()
    assert compute_kd_loss(t, s, 2.0, divergence="jsd", beta=0.0).item() == pytest.approx(fwd, rel=1e-6)
    assert compute_kd_loss(t, s, 2.0, divergence="jsd", beta=1.0).item() == pytest.approx(rev, rel=1e-6)
    # ... and they are the limits of the normalised divergence as beta approaches each end.
    tn, sn = make_inputs(9)
    eps = 1e-4
    assert ref_divergence(tn, sn, 2.0, "jsd", eps).mean() / eps == pytest.approx(fwd, rel=1e-3)
    assert ref_divergence(tn, sn, 2.0, "jsd", 1 - eps).mean() / eps == pytest.approx(rev, rel=1e-3)


# ------------------------------------------------------------------------------------ sparse targets


@pytest.mark.parametrize("div", DIVERGENCES)
def test_sparse_with_full_k_equals_dense(div):
    t, s = (mx.array(x, mx.float32) for x in make_inputs(10))
    dense = compute_kd_loss(t, s, 2.0, divergence=div).item()
    sparse = compute_kd_loss(topk_targets(t, t.shape[-1]), s, 2.0, divergence=div).item()
    assert sparse == pytest.approx(dense, rel=1e-5)


def test_sparse_matches_float64_reference_of_the_bucketed_distribution():
    rng = np.random.default_rng(11)
    V, k, T = 50, 5, 2.0
    t = rng.normal(size=(3, V)) * 4
    s = rng.normal(size=(3, V)) * 4
    idx = np.argsort(-t, -1)[:, :k]
    top = np.take_along_axis(t, idx, -1)
    lse = np.log(np.exp(t).sum(-1))
    tail = np.log1p(-np.exp(top - lse[:, None]).sum(-1)) + lse
    t_b = np.concatenate([top / T, (tail[:, None] - np.log(V - k)) / T + np.log(V - k)], -1)
    s_top = np.take_along_axis(s, idx, -1)
    rest = np.ones_like(s, bool)
    np.put_along_axis(rest, idx, False, -1)
    s_tail = np.log(np.where(rest, np.exp(s / T), 0).sum(-1))
    s_b = np.concatenate([s_top / T, s_tail[:, None]], -1)
    expected = T * T * _kl(_log_softmax(t_b), _log_softmax(s_b)).mean()
    got = compute_kd_loss(SparseTargets(mx.array(top, mx.float32), mx.array(idx), mx.array(lse, mx.float32)), mx.array(s, mx.float32), T)
    assert rel_err(got.item(), expected) <= TOL


def test_sparse_error_against_dense_is_small_for_peaked_teachers():
    """Documented approximation error: for LM-like (peaked) teacher rows, top-k loses little."""
    rng = np.random.default_rng(12)
    V = 2000
    # Zipf-like teacher logits, a student that is a noisy copy of it.
    base = -1.1 * np.log(np.arange(1, V + 1))
    t = np.stack([rng.permutation(base) for _ in range(64)]) * 3.0
    s = t + rng.normal(size=t.shape) * 0.5
    tm, sm = mx.array(t, mx.float32), mx.array(s, mx.float32)
    for T in (1.0, 2.0):
        dense = compute_kd_loss(tm, sm, T).item()
        errs = {k: abs(compute_kd_loss(topk_targets(tm, k), sm, T).item() - dense) / dense for k in (16, 64, 256)}
        assert errs[256] <= errs[16] + 1e-9
        # Measured: T=1: 0.2% / 0.01% / 0% for k = 16/64/256; T=2: 14% / 5% / 2% (the tail's inner shape
        # is what top-k cannot keep, and tempering moves mass into the tail).
        assert errs[64] < (0.005 if T == 1.0 else 0.10), errs


# ------------------------------------------------------------------------------------- properties

logit_rows = arrays(np.float64, (3, 6), elements=st.floats(-20, 20, allow_nan=False, allow_infinity=False))


@settings(max_examples=60, deadline=None)
@given(t=logit_rows, s=logit_rows, T=st.sampled_from(TEMPERATURES))
def test_divergences_are_nonnegative(t, s, T):
    for div in DIVERGENCES:
        assert compute_kd_loss(mx.array(t, mx.float32), mx.array(s, mx.float32), T, divergence=div).item() >= -1e-6


@settings(max_examples=60, deadline=None)
@given(t=logit_rows, T=st.sampled_from(TEMPERATURES))
def test_divergence_of_a_distribution_with_itself_is_zero(t, T):
    x = mx.array(t, mx.float32)
    for div in DIVERGENCES:
        # float32 rounding of the two equal rows (~1e-7 a token) is scaled by T^2 like the loss itself
        assert abs(compute_kd_loss(x, x, T, divergence=div).item()) <= 1e-6 * max(1.0, T * T)


@settings(max_examples=60, deadline=None)
@given(t=logit_rows, s=logit_rows)
def test_jsd_symmetric_and_bounded_by_log2(t, s):
    a, b = mx.array(t, mx.float32), mx.array(s, mx.float32)
    ab = compute_kd_loss(a, b, 1.0, divergence="jsd", beta=0.5).item()
    ba = compute_kd_loss(b, a, 1.0, divergence="jsd", beta=0.5).item()
    assert ab == pytest.approx(ba, abs=1e-6)
    assert ab <= np.log(2) + 1e-6


@settings(max_examples=60, deadline=None)
@given(t=logit_rows, s=logit_rows, c=st.floats(-50, 50), row=st.integers(0, 2), T=st.sampled_from(TEMPERATURES))
def test_kd_invariant_to_adding_a_constant_to_a_row(t, s, c, row, T):
    for div in DIVERGENCES:
        base = compute_kd_loss(mx.array(t, mx.float32), mx.array(s, mx.float32), T, divergence=div).item()
        t2, s2 = t.copy(), s.copy()
        t2[row] += c
        s2[(row + 1) % 3] -= c
        shifted = compute_kd_loss(mx.array(t2, mx.float32), mx.array(s2, mx.float32), T, divergence=div).item()
        assert shifted == pytest.approx(base, rel=1e-4, abs=1e-4)


def test_no_warning_for_normal_masks():
    t, s = make_inputs(13)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_kd_loss(mx.array(t, mx.float32), mx.array(s, mx.float32), 2.0, mx.ones(t.shape[:2], dtype=mx.bool_))


def test_masked_infinite_positions_do_not_poison_the_mean():
    """A padding row may have an infinite divergence; masked, it must not turn the loss into NaN."""
    t = np.zeros((1, 2, 4))
    s = np.zeros((1, 2, 4))
    t[0, 1, 0] = -np.inf  # row 1: the teacher excludes a token the student allows -> reverse KL is inf there
    mask = mx.array([[True, False]])
    for div in DIVERGENCES:
        val, grad = mx.value_and_grad(lambda x, d=div: compute_kd_loss(mx.array(t, mx.float32), x, 1.0, mask, divergence=d))(mx.array(s, mx.float32))
        assert val.item() == 0.0 and np.isfinite(np.array(grad)).all(), div


def test_sparse_tail_below_float32_resolution_keeps_reverse_kl_finite():
    t = np.full((1, 1, 50), -60.0)
    t[..., 0] = 40.0  # all mass on one token; the tail rounds to 0 in float32
    s = mx.array(np.random.default_rng(0).normal(size=(1, 1, 50)), mx.float32)
    for div in DIVERGENCES:
        val = compute_kd_loss(topk_targets(mx.array(t, mx.float32), 4), s, 2.0, divergence=div)
        assert np.isfinite(val.item()), div


def test_the_loss_functions_are_importable_from_true_kd():
    """`conch_dna.training.true_kd` exports the loss functions and the distiller."""
    from conch_dna.training import true_kd
    from conch_dna.training.kd import cross_vocab, losses

    assert true_kd.compute_kd_loss is losses.compute_kd_loss and true_kd.compute_ce_loss is losses.compute_ce_loss
    assert true_kd.align_vocab_sizes is cross_vocab.align_vocab_sizes
    t = mx.array([[[1.0, 2.0, 0.5]]])
    assert float(true_kd.compute_kd_loss(t, t, 2.0)) == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------- loops


def test_repeated_rows_are_the_tokens_the_judge_counts_as_repeated():
    """repeated_ngram_rows marks exactly the tokens evaluate.repeated_ngram_share counts, in next_token_view's
    layout, within each row's response only (a prompt's n-grams and other rows never count)."""
    from conch_dna.training.kd.evaluate import repeated_ngram_share
    from conch_dna.training.kd.losses import repeated_ngram_rows

    rng = np.random.default_rng(3)
    B, L = 5, 40
    tokens = rng.integers(0, 4, size=(B, L))  # a 4-token vocabulary: many repeats
    tokens[1] = tokens[0]  # another row's n-grams must not count
    mask = np.zeros((B, L), bool)
    starts, ends = [3, 10, 0, 20, 36], [40, 33, 40, 24, 40]
    for b, (s, e) in enumerate(zip(starts, ends)):
        mask[b, s:e] = True
    rows = np.array(repeated_ngram_rows(mx.array(tokens), mx.array(mask)))
    assert rows.shape == (B, L - 1)
    for b, (s, e) in enumerate(zip(starts, ends)):
        response = list(tokens[b, s:e])
        n_grams = max(len(response) - 3, 0)
        assert rows[b].sum() == round(repeated_ngram_share([response]) * n_grams)
        assert not rows[b, : s + 2].any() and not rows[b, e - 1 :].any()
    loop = mx.array([[7, 7, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 5]])
    marked = np.flatnonzero(np.array(repeated_ngram_rows(loop, mx.array([[0, 0] + [1] * 11]))[0]))
    assert list(marked) == [8, 9, 10]  # rows predicting the 2nd loop's "4", then "1", "2"


def test_unlikelihood_pushes_down_only_the_tokens_that_repeat():
    """UL = -log(1 - p) of each repeated token, summed and divided by the response tokens; its gradient lowers
    those tokens' probabilities and leaves rows without a repeat alone."""
    from conch_dna.training.kd.losses import repeated_ngram_rows

    tokens = mx.array([[7, 7, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 5]])
    mask = mx.array([[0, 0] + [1] * 11]).astype(mx.bool_)
    logits = mx.array(np.random.default_rng(0).normal(size=(1, 13, 9)).astype(np.float32))
    teacher = mx.array(np.random.default_rng(1).normal(size=(1, 13, 9)).astype(np.float32))
    base = kd_objective(logits, teacher, tokens, mask)
    out = kd_objective(logits, teacher, tokens, mask, LossSpec(unlikelihood=2.0))
    logq = np.array(logits[0, :-1]) - np.log(np.exp(np.array(logits[0, :-1])).sum(-1, keepdims=True))
    p = np.exp(logq[np.arange(12), np.array(tokens[0, 1:])])
    rows = np.array(repeated_ngram_rows(tokens, mask))[0]
    expected = -np.log1p(-p[rows]).sum() / 11
    assert abs(out["ul"].item() - expected) < 1e-5 and base["ul"].item() == 0.0
    assert abs(out["loss"].item() - (base["loss"].item() + 2.0 * expected)) < 1e-5

    def ul_only(x):
        return kd_objective(x, teacher, tokens, mask, LossSpec(unlikelihood=1.0))["ul"]

    g = np.array(mx.grad(ul_only)(logits))[0, :-1]
    assert not np.abs(g[~rows]).any()  # rows without a repeat get no gradient
    stepped = logits - 0.5 * mx.grad(ul_only)(logits)
    logq2 = np.array(stepped[0, :-1]) - np.log(np.exp(np.array(stepped[0, :-1])).sum(-1, keepdims=True))
    p2 = np.exp(logq2[np.arange(12), np.array(tokens[0, 1:])])
    assert (p2[rows] < p[rows]).all()


def test_no_repeat_teacher_lowers_only_the_repeated_token_dense_and_sparse_alike():
    from conch_dna.training.kd.losses import REPEAT_PENALTY, without_repeats

    rng = np.random.default_rng(5)
    t = mx.array(rng.normal(size=(2, 6, 12)).astype(np.float32) * 3)
    targets = mx.array(rng.integers(0, 12, size=(2, 6)))
    repeated = mx.array(rng.random((2, 6)) < 0.5)
    dense = np.array(without_repeats(t, targets, repeated))
    diff = np.array(t) - dense
    for b in range(2):
        for i in range(6):
            expected = np.zeros(12)
            if np.array(repeated)[b, i]:
                expected[np.array(targets)[b, i]] = REPEAT_PENALTY
            assert np.allclose(diff[b, i], expected)
    # Sparse with k = V holds every token: the same distribution as the dense result.
    sparse = without_repeats(topk_targets(t, 12), targets, repeated)
    full = topk_targets(mx.array(dense), 12)
    assert np.allclose(np.array(sparse.logsumexp), np.array(full.logsumexp), atol=1e-5)
    s = mx.array(rng.normal(size=(2, 6, 12)).astype(np.float32))
    assert abs(compute_kd_loss(sparse, s, 1.0).item() - compute_kd_loss(mx.array(dense), s, 1.0).item()) < 1e-5
