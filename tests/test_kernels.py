"""The CUDA kernels against the portable paths (runs on the GPU machine; skipped where there is no CUDA).

    python3 -m pytest -q tests/test_kernels.py      # on the GPU machine, MLX staged as in docs/benchmarks.md
"""

import mlx.core as mx
import pytest

from conch_dna.training.kd import kernels
from conch_dna.training.kd.fused import Chunking, Rows, TeacherStates, fused_kd_loss
from conch_dna.training.kd.losses import kd_objective

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs MLX's CUDA backend (an NVIDIA GPU)")


def _rows(c, v, dtype, seed):
    k = mx.random.split(mx.random.key(seed), 3)
    s = (mx.random.normal((c, v), key=k[0]) * 3).astype(dtype)
    t = (mx.random.normal((c, v), key=k[1]) * 3).astype(dtype)
    y = mx.random.randint(0, v, (c,), key=k[2])
    return s, t, y


def _offset(x: mx.array, layout: str) -> mx.array:
    """x itself, or the same values in a view that starts 3 elements past its buffer's start (not 16-byte
    aligned: the kernels' one-value-at-a-time path)."""
    if layout == "aligned":
        return x
    flat = mx.concatenate([mx.zeros((3,), x.dtype), x.reshape(-1)])
    return flat[3:].reshape(x.shape)


@pytest.mark.parametrize("v", [7, 1000, 151936])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
@pytest.mark.parametrize("dtype,layout", [(mx.float32, "aligned"), (mx.bfloat16, "aligned"), (mx.bfloat16, "offset")])
def test_kernel_rows_match_float32_math(v, temperature, dtype, layout):
    """Against float32 math on the same (rounded) logits: float32 and bfloat16 (the training dtype; 16-byte
    loads of 8 values where V divides), and a misaligned view (one value at a time)."""
    s, t, y = _rows(64, v, dtype, v)
    s, t = _offset(s, layout), _offset(t, layout)
    mask = (mx.arange(64) % 5 != 0).astype(mx.float32)
    wk, wc = 0.7 * mask / 50, 0.3 * mask / 50
    g, kd, ce = kernels.forward_kl_ce_rows(s, t, y, wk, wc, temperature)
    assert g.dtype == dtype and g.shape == (64, v)
    s, t, T = s.astype(mx.float32), t.astype(mx.float32), temperature
    logq = s / T - mx.logsumexp(s / T, axis=-1, keepdims=True)
    logp = t / T - mx.logsumexp(t / T, axis=-1, keepdims=True)
    want_kd = T * T * (mx.exp(logp) * (logp - logq)).sum(-1)
    lse = mx.logsumexp(s, axis=-1)
    want_ce = lse - mx.take_along_axis(s, y[:, None], -1)[:, 0]
    onehot = (mx.arange(v)[None] == y[:, None]).astype(mx.float32)
    want_g = wk[:, None] * T * (mx.exp(logq) - mx.exp(logp)) + wc[:, None] * (mx.exp(s - lse[:, None]) - onehot)
    on = mask > 0
    assert mx.allclose(mx.where(on, kd, 0), mx.where(on, want_kd, 0), rtol=1e-4, atol=1e-5).item()
    assert mx.allclose(mx.where(on, ce, 0), mx.where(on, want_ce, 0), rtol=1e-4, atol=1e-5).item()
    if dtype == mx.float32:
        assert mx.allclose(g, want_g, rtol=1e-3, atol=1e-8).item()
    else:  # float32's tolerance plus one rounding to bfloat16 (half its step: 2^-8 relative)
        assert mx.all(mx.abs(g.astype(mx.float32) - want_g) <= (1e-3 + 2.0 ** -8) * mx.abs(want_g) + 1e-8).item()
    assert mx.all(mx.where(on[:, None], 0, g) == 0).item()  # masked rows: zero gradient


def test_fused_loss_with_kernel_matches_reference_values_and_gradients():
    B, L, D, Dt, V = 2, 96, 64, 96, 5000
    k = mx.random.split(mx.random.key(0), 5)
    h = mx.random.normal((B * L, D), key=k[0])
    ht = mx.random.normal((B * L, Dt), key=k[1])
    w_s = mx.random.normal((V, D), key=k[2]) * 0.2
    w_t = mx.random.normal((V, Dt), key=k[3]) * 0.2
    y = mx.random.randint(0, V, (B * L,), key=k[4])
    mask = mx.arange(B * L) % 7 != 3

    def fused(x):
        return fused_kd_loss(x, lambda a: a @ w_s.T, TeacherStates(ht, lambda a: a @ w_t.T), Rows(y, mask),
                             chunking=Chunking(64))["loss"]

    def reference(x):
        s = (x @ w_s.T)[None]
        t = (ht @ w_t.T)[None]
        tokens = mx.concatenate([mx.zeros((1, 1), mx.int32), y[None]], axis=1)
        m = mx.concatenate([mx.zeros((1, 1), mx.bool_), mask[None]], axis=1)
        pad = mx.zeros((1, 1, V))
        return kd_objective(mx.concatenate([s, pad], 1), mx.concatenate([t, pad], 1), tokens, m)["loss"]

    (a, ga), (b, gb) = mx.value_and_grad(fused)(h), mx.value_and_grad(reference)(h)
    assert abs(a.item() - b.item()) <= 1e-4 * abs(b.item())
    assert mx.allclose(ga, gb, rtol=1e-3, atol=1e-6).item()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7), (8, 128, 4864)])
@pytest.mark.parametrize("layout", ["aligned", "offset"])
def test_swiglu_kernels_match_autodiff(dtype, shape, layout):
    """`kernels.swiglu_forward` and `kernels.swiglu_backward` against float32 MLX ops and their autodiff: packed
    (16-byte loads where the size divides), one value at a time (odd size, misaligned view)."""
    import mlx.nn as nn

    gate, up, dy = (mx.random.normal(shape, key=mx.random.key(i)) * 3 for i in range(3))
    out_ref, (dg_ref, du_ref) = mx.vjp(lambda g, u: nn.silu(g) * u, [gate, up], [dy])  # float32 reference
    gate, up, dy = (_offset(a.astype(dtype), layout) for a in (gate, up, dy))
    out = kernels.swiglu_forward(gate, up)
    dg, du = kernels.swiglu_backward(gate, up, dy)
    assert out.dtype == dg.dtype == du.dtype == dtype and out.shape == dg.shape == du.shape == shape
    tol = 1e-5 if dtype == mx.float32 else 2e-2  # bf16: its inputs' and outputs' rounding
    for got, want in ((out, out_ref[0]), (dg, dg_ref), (du, du_ref)):
        err = mx.linalg.norm((got.astype(mx.float32) - want).reshape(-1)) / mx.linalg.norm(want.reshape(-1))
        assert err.item() <= tol


def test_teacher_kernels_switch_the_swiglu_mlps_and_keep_the_teacher_s_output():
    """Inside `teacher_kernels` a Qwen2-shaped model's MLPs compute SwiGLU by the kernel: the same hidden
    states up to bfloat16 rounding, and the model's classes as they were afterwards."""
    import mlx.nn as nn
    from mlx_lm.models import qwen2

    args = qwen2.ModelArgs(model_type="qwen2", hidden_size=128, num_hidden_layers=2, intermediate_size=512,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=256)
    model = qwen2.Model(args)
    model.set_dtype(mx.bfloat16)
    tokens = mx.random.randint(0, 256, (2, 64), key=mx.random.key(0))
    want = model.model(tokens).astype(mx.float32)
    with kernels.teacher_kernels(model):
        assert type(model.model.layers[0].mlp).__name__ == "RecomputingMLP"
        got = model.model(tokens).astype(mx.float32)
    assert type(model.model.layers[0].mlp) is qwen2.MLP and type(model.model.layers[0].self_attn.rope) is nn.RoPE
    err = mx.linalg.norm((got - want).reshape(-1)) / mx.linalg.norm(want.reshape(-1))
    assert err.item() <= 2e-2


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("layout", ["transposed", "contiguous", "sliced"])
@pytest.mark.parametrize("shape,base", [((2, 12, 1024, 128), 1e6), ((3, 2, 37, 64), 1e4), ((1, 3, 5, 6), 1e4)])
def test_rope_kernel_matches_mlx_rope_and_its_gradient(dtype, layout, shape, base):
    """kernels.rope against mx.fast.rope: the attention's [B, H, L, D] view of [B, L, H, D] memory (as
    mlx-lm's attention passes it), a contiguous array, and a view that starts past its buffer's start."""
    B, H, L, D = shape
    key = mx.random.key(L)
    if layout == "transposed":
        x = mx.random.normal((B, L, H, D), key=key).astype(dtype).transpose(0, 2, 1, 3)
    elif layout == "contiguous":
        x = mx.random.normal(shape, key=key).astype(dtype)
    else:
        x = mx.random.normal((B + 1, H, L, D), key=key).astype(dtype)[1:]
    cot = mx.random.normal(shape, key=mx.random.key(1)).astype(dtype)
    (got,), (g_got,) = mx.vjp(lambda a: kernels.rope(a, base), [x], [cot])
    (want,), (g_want,) = mx.vjp(lambda a: mx.fast.rope(a, D, traditional=False, base=base, scale=1.0, offset=0), [x], [cot])
    assert got.shape == want.shape == shape and got.dtype == dtype and g_got.shape == shape
    # Same angle, same arithmetic as MLX's kernel: the rotation almost always equal (on the H200, float32: every
    # value), its gradient a rounding step apart on the scale of the inputs (x1 cos - x2 sin can cancel: the
    # error is relative to |x|, up to ~5 here, not to the result; float32: 85% equal, at most 2.1e-7 apart,
    # against MLX's vjp). So float32 allows 2^-20 (8 float32 steps at 1.0), bfloat16 two of its steps.
    ulp = 2.0 ** (-7 if dtype == mx.bfloat16 else -20)
    for a, b in ((got, want), (g_got, g_want)):
        a, b = a.astype(mx.float32), b.astype(mx.float32)
        assert mx.all(mx.abs(a - b) <= ulp * mx.maximum(mx.abs(b), 1.0)).item()
    assert mx.mean((got == want).astype(mx.float32)).item() > 0.99


def test_kernel_rope_module_runs_the_kernel_only_for_training_calls():
    import mlx.nn as nn

    rope = nn.RoPE(64, base=1e4)
    rope.__class__ = kernels.KernelRoPE
    x = mx.random.normal((1, 2, 5, 64), key=mx.random.key(0))
    assert mx.allclose(rope(x), nn.RoPE(64, base=1e4)(x), atol=1e-6).item()
    assert mx.array_equal(rope(x, offset=3), nn.RoPE(64, base=1e4)(x, offset=3)).item()  # generation: MLX's own
