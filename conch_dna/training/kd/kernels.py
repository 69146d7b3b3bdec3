"""CUDA kernels for the KD step, each with the portable path it replaces (CPU, Apple silicon, or
CONCH_FUSED_KERNEL=0): the fused loss's per-chunk elementwise work, SwiGLU's backward, and RoPE.

The loss (forward KL + CE). Given one chunk of student and teacher logits [C, V] (bf16 straight out of the
two head matmuls), one thread block per row computes in a single kernel what otherwise takes a dozen float32
passes over [C, V]:
  pass 1 (online, one read):  logsumexp of s/T, t/T and s, and sum_j p_j (t_j - s_j) / T,
  pass 2 (one read, one write): dL/ds_j = wk * T * (q_j - p_j) + wc * (softmax(s)_j - [j == y]),
plus each row's KD term T^2 KL(p || q) and CE term. p = softmax(t/T), q = softmax(s/T); wk, wc are the
row's weights (mask, alpha and 1/n folded in). Float32 arithmetic throughout, as in the portable path.

`mx.fast.cuda_kernel` compiles it on NVIDIA GPUs (MLX's CUDA backend). On the CPU the same arithmetic runs
in NumPy (`forward_kl_ce_rows_numpy`): MLX's CPU backend evaluates exp ~14x slower than NumPy's vectorised
one (8.4M floats: 110 ms vs 7.6 ms here), and this loss is exp-bound. On Apple silicon's GPU `fused.py` runs
its compiled MLX path. All agree to float32 rounding (tests/test_fused.py on CPU, tests/test_kernels.py on
the GPU machine).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache, lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

BLOCK = 512  # threads per row; 151936 columns -> ~300 per thread per pass

_SOURCE = r"""
    const int row = blockIdx.x;
    const int tid = threadIdx.x;
    const int V = s_shape[1];
    const float inv_t = 1.0f / temp[0];
    const float wk = weights[2 * row];
    const float wc = weights[2 * row + 1];
    const int y = targets[row];
    const size_t base = (size_t)row * V;
    const float NEG = -INFINITY;

    // Online log-sum-exp of three streams (s/T, t/T, s) and A = sum exp(t/T - mt) * (t - s) / T.
    float ms = NEG, ls = 0.f, mt = NEG, lt = 0.f, m1 = NEG, l1 = 0.f, A = 0.f;
    if (wk != 0.f || wc != 0.f) {
        for (int j = tid; j < V; j += BLOCK) {
            float sv = static_cast<float>(s[base + j]);
            float tv = static_cast<float>(t[base + j]);
            float a = sv * inv_t, b = tv * inv_t;
            if (a > ms) { ls = ls * __expf(ms - a) + 1.f; ms = a; } else { ls += __expf(a - ms); }
            if (b > mt) { float r = __expf(mt - b); lt = lt * r + 1.f; A = A * r + (b - a); mt = b; }
            else { float e = __expf(b - mt); lt += e; A += e * (b - a); }
            if (sv > m1) { l1 = l1 * __expf(m1 - sv) + 1.f; m1 = sv; } else { l1 += __expf(sv - m1); }
        }
    }
    __shared__ float sh[7][BLOCK];
    sh[0][tid] = ms; sh[1][tid] = ls; sh[2][tid] = mt; sh[3][tid] = lt; sh[4][tid] = A;
    sh[5][tid] = m1; sh[6][tid] = l1;
    __syncthreads();
    for (int stride = BLOCK / 2; stride > 0; stride >>= 1) {
        if (tid < stride) {
            int o = tid + stride;
            // merge (m, l) pairs; a side with m = -inf holds nothing
            float mA = sh[0][tid], mB = sh[0][o];
            if (mB > mA) { sh[1][tid] = sh[1][tid] * __expf(mA - mB) + sh[1][o]; sh[0][tid] = mB; }
            else if (mB != NEG) { sh[1][tid] += sh[1][o] * __expf(mB - mA); }
            mA = sh[2][tid]; mB = sh[2][o];
            if (mB > mA) { float r = __expf(mA - mB); sh[3][tid] = sh[3][tid] * r + sh[3][o];
                           sh[4][tid] = sh[4][tid] * r + sh[4][o]; sh[2][tid] = mB; }
            else if (mB != NEG) { float r = __expf(mB - mA); sh[3][tid] += sh[3][o] * r; sh[4][tid] += sh[4][o] * r; }
            mA = sh[5][tid]; mB = sh[5][o];
            if (mB > mA) { sh[6][tid] = sh[6][tid] * __expf(mA - mB) + sh[6][o]; sh[5][tid] = mB; }
            else if (mB != NEG) { sh[6][tid] += sh[6][o] * __expf(mB - mA); }
        }
        __syncthreads();
    }
    if (wk == 0.f && wc == 0.f) {  // a masked row: no loss, zero gradient (even if its logits are inf)
        for (int j = tid; j < V; j += BLOCK) g[base + j] = static_cast<OutT>(0.f);
        if (tid == 0) { stats[2 * row] = 0.f; stats[2 * row + 1] = 0.f; }
        return;
    }
    const float lse_q = sh[0][0] + __logf(sh[1][0]);
    const float lse_p = sh[2][0] + __logf(sh[3][0]);
    const float lse_1 = sh[5][0] + __logf(sh[6][0]);
    if (tid == 0) {
        float kl = sh[4][0] / sh[3][0] - lse_p + lse_q;
        float T = temp[0];
        stats[2 * row] = T * T * fmaxf(kl, 0.f);
        stats[2 * row + 1] = lse_1 - static_cast<float>(s[base + y]);
    }
    const float gk = wk * temp[0];
    for (int j = tid; j < V; j += BLOCK) {
        float sv = static_cast<float>(s[base + j]);
        float tv = static_cast<float>(t[base + j]);
        float q = __expf(sv * inv_t - lse_q);
        float p = __expf(tv * inv_t - lse_p);
        float sm = __expf(sv - lse_1);
        float v = gk * (q - p) + wc * (sm - (j == y ? 1.f : 0.f));
        g[base + j] = static_cast<OutT>(v);
    }
"""


def _enabled() -> bool:
    return os.environ.get("CONCH_FUSED_KERNEL", "1") != "0"


def numpy_available() -> bool:
    """True on the CPU device (unless CONCH_FUSED_KERNEL=0)."""
    return _enabled() and mx.default_device() == mx.cpu


def available() -> bool:
    """True where the fused kernel can run: MLX's CUDA backend on the default (GPU) device.
    CONCH_FUSED_KERNEL=0 turns it off (the portable path then runs everywhere: for comparisons)."""
    if not _enabled():
        return False
    try:
        return mx.default_device() == mx.gpu and mx.cuda.is_available()
    except AttributeError:  # an MLX without the cuda module
        return False


@lru_cache(maxsize=1)
def _kernel():
    return mx.fast.cuda_kernel(
        name="conch_forward_kl_ce_rows",
        input_names=["s", "t", "targets", "weights", "temp"],
        output_names=["g", "stats"],
        source=_SOURCE,
        header=f"#define BLOCK {BLOCK}\n",
    )


def forward_kl_ce_rows(s: mx.array, t: mx.array, targets: mx.array, wk: mx.array, wc: mx.array,
                       temperature: float) -> tuple[mx.array, mx.array, mx.array]:
    """(dL/ds [C, V] in s's dtype, KD per row [C] (T^2-scaled), CE per row [C]) for one chunk."""
    rows = s.shape[0]
    weights = mx.stack([wk.astype(mx.float32), wc.astype(mx.float32)], axis=-1)
    g, stats = _kernel()(
        inputs=[s, t, targets.astype(mx.int32), weights, mx.array([float(temperature)], dtype=mx.float32)],
        template=[("OutT", s.dtype)],
        grid=(rows * BLOCK, 1, 1),
        threadgroup=(BLOCK, 1, 1),
        output_shapes=[s.shape, (rows, 2)],
        output_dtypes=[s.dtype, mx.float32],
    )
    return g, stats[:, 0], stats[:, 1]


def forward_kl_ce_rows_numpy(s: np.ndarray, t: np.ndarray, targets: np.ndarray, wk: np.ndarray, wc: np.ndarray,
                             temperature: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kernel's arithmetic in NumPy float32 (CPU): three exps per element, each reused for its softmax."""
    T = np.float32(temperature)
    rows = np.arange(s.shape[0])

    def softmax_parts(x):
        m = x.max(axis=-1, keepdims=True)
        e = np.exp(x - m)
        z = e.sum(axis=-1, keepdims=True)
        e /= z
        return e, (m + np.log(z))[:, 0]

    a, b = s / T, t / T
    q, lse_q = softmax_parts(a)
    p, lse_p = softmax_parts(b)
    b -= a  # b is now (t - s) / T
    kd_tok = T * T * np.maximum(np.einsum("ij,ij->i", p, b) - lse_p + lse_q, 0.0)
    del a, b
    sm, lse_1 = softmax_parts(s)
    ce_tok = lse_1 - s[rows, targets]
    q -= p
    q *= (wk * T)[:, None]
    sm *= wc[:, None]
    q += sm
    q[rows, targets] -= wc
    q[(wk == 0) & (wc == 0)] = 0.0  # masked rows: zero gradient, whatever their logits
    return q, kd_tok.astype(np.float32), ce_tok.astype(np.float32)


_SWIGLU_BACKWARD = """
    const size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < N) {
        const float g = static_cast<float>(gate[i]), u = static_cast<float>(up[i]), d = static_cast<float>(dy[i]);
        const float sig = 1.0f / (1.0f + expf(-g));
        d_gate[i] = static_cast<T>(d * u * sig * (1.0f + g * (1.0f - sig)));
        d_up[i] = static_cast<T>(d * g * sig);
    }
"""


@lru_cache(maxsize=1)
def _swiglu_kernel():
    return mx.fast.cuda_kernel(name="conch_swiglu_backward", input_names=["gate", "up", "dy"],
                               output_names=["d_gate", "d_up"], source=_SWIGLU_BACKWARD)


def swiglu_backward(gate: mx.array, up: mx.array, dy: mx.array) -> tuple[mx.array, mx.array]:
    """The gradients of silu(gate) * up in one pass over gate, up and dy (CUDA; `available()`), the sigmoid
    recomputed in float32."""
    n = gate.size
    return _swiglu_kernel()(inputs=[gate, up, dy.astype(gate.dtype)], template=[("T", gate.dtype), ("N", n)],
                            grid=(-(-n // 256) * 256, 1, 1), threadgroup=(256, 1, 1),
                            output_shapes=[gate.shape, up.shape], output_dtypes=[gate.dtype, up.dtype])


# RoPE (mlx-lm's default, non-traditional: the two halves of each head rotated). MLX's CUDA kernel spent 44 us
# a call on a [8, 12, 1024, 128] bf16 view (the teacher's queries, still in [B, L, H, D] memory after the
# transpose): 8.4 of a 134 ms batch-8 KD step on an H200 (`bench_kd.py --kernels`). Here one thread takes V
# neighbouring frequencies of one position through all H heads (H a constant: the loop unrolls, every load is
# issued at once), V values per load where the layout allows. The angle is computed as MLX does
# (mlx/backend/cuda/rope.cu), for the same bits (float32: every value equal on the H200). That step's RoPE
# time: ~4.5-5 ms (session 13, docs/benchmarks.md). The output keeps the input's usual memory layout,
# [B, L, H, D] (what the attention reads and the gradient reshapes back into), returned as a [B, H, L, D] view.
_ROPE_HEADER = """
template <typename T, int V> struct alignas(sizeof(T) * V) RopePack { T v[V]; };
"""
_ROPE = r"""
    const int B = x_shape[0], L = x_shape[2];
    const size_t n = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (n >= size_t(B) * L * (HALF / V)) return;
    const int i0 = (n % (HALF / V)) * V;
    const size_t bl = n / (HALF / V);
    const int l = bl % L, b = bl / L;
    float c[V], s[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
        const float d = static_cast<float>(i0 + k) / static_cast<float>(HALF);
        const float inv_freq = exp2(-d * params[0]);
        const float theta = (params[1] * static_cast<float>(l)) * inv_freq;
        c[k] = cos(theta);
        s[k] = sin(theta);
    }
    const int64_t s1 = x_strides[1], s3 = x_strides[3];
    const int64_t in0 = b * x_strides[0] + l * x_strides[2] + i0 * s3;
    const bool packed = s3 == 1 && (x_strides[0] % V) == 0 && (s1 % V) == 0 && (x_strides[2] % V) == 0
                        && reinterpret_cast<unsigned long long>(x) % sizeof(RopePack<T, V>) == 0;
    T* o = out + bl * H * (2 * HALF) + i0;
#pragma unroll
    for (int h = 0; h < H; ++h) {
        RopePack<T, V> a, b2, r1, r2;
        if (packed) {
            a = *reinterpret_cast<const RopePack<T, V>*>(x + in0 + h * s1);
            b2 = *reinterpret_cast<const RopePack<T, V>*>(x + in0 + h * s1 + HALF);
        } else {
#pragma unroll
            for (int k = 0; k < V; ++k) {
                a.v[k] = x[in0 + h * s1 + k * s3];
                b2.v[k] = x[in0 + h * s1 + (k + HALF) * s3];
            }
        }
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const float x1 = static_cast<float>(a.v[k]), x2 = static_cast<float>(b2.v[k]);
            float y1, y2;
            if (FORWARD) { y1 = x1 * c[k] - x2 * s[k]; y2 = x1 * s[k] + x2 * c[k]; }
            else { y1 = x2 * s[k] + x1 * c[k]; y2 = x2 * c[k] - x1 * s[k]; }
            r1.v[k] = static_cast<T>(y1);
            r2.v[k] = static_cast<T>(y2);
        }
        *reinterpret_cast<RopePack<T, V>*>(o + h * (2 * HALF)) = r1;
        *reinterpret_cast<RopePack<T, V>*>(o + h * (2 * HALF) + HALF) = r2;
    }
"""


@lru_cache(maxsize=1)
def _rope_kernel():
    return mx.fast.cuda_kernel(name="conch_rope", input_names=["x", "params"], output_names=["out"], source=_ROPE,
                               header=_ROPE_HEADER, ensure_row_contiguous=False)


def _rope_rotate(x: mx.array, params: mx.array, forward: bool) -> mx.array:
    B, H, L, D = x.shape
    half = D // 2
    v = 4 if half % 4 == 0 else 2 if half % 2 == 0 else 1
    n = B * L * (half // v)
    (out,) = _rope_kernel()(inputs=[x, params],
                            template=[("T", x.dtype), ("FORWARD", forward), ("H", H), ("HALF", half), ("V", v)],
                            grid=(-(-n // 128) * 128, 1, 1), threadgroup=(128, 1, 1),
                            output_shapes=[(B, L, H, D)], output_dtypes=[x.dtype])
    return out.transpose(0, 2, 1, 3)


@mx.custom_function
def _rope(x: mx.array, params: mx.array) -> mx.array:
    return _rope_rotate(x, params, True)


@_rope.vjp
def _rope_vjp(primals, cotangent, output):
    return _rope_rotate(cotangent, primals[1], False), mx.zeros_like(primals[1])


@cache
def _rope_params(base: float, scale: float) -> mx.array:
    # One small array per RoPE setting, not one per call (the teacher's eager pass makes two calls a block).
    return mx.array([math.log2(base), scale], dtype=mx.float32)


def rope(x: mx.array, base: float, scale: float = 1.0) -> mx.array:
    """`mx.fast.rope(x, D, traditional=False, base=base, scale=scale, offset=0)` for x [B, H, L, D] (CUDA;
    `available()`), with its gradient (the inverse rotation)."""
    return _rope(x, _rope_params(float(base), float(scale)))


class KernelRoPE(nn.RoPE):
    """`nn.RoPE` whose training-shaped calls (4-D, whole heads rotated, no offset) run `rope` on NVIDIA GPUs;
    every other call, and every call elsewhere, is `nn.RoPE`'s."""

    def __call__(self, x, offset=0):
        if (available() and not self.traditional and x.ndim == 4 and x.shape[-1] == self.dims and self.dims % 2 == 0
                and isinstance(offset, int) and offset == 0):
            return rope(x, self.base, self.scale)
        return super().__call__(x, offset)


def use_rope_kernel(model: nn.Module) -> list[nn.Module]:
    """Switch `model`'s `nn.RoPE` modules (exactly that class: scaled variants keep theirs) to `KernelRoPE`, in
    place; returns the modules switched."""
    switched = [m for m in model.modules() if type(m) is nn.RoPE]
    for m in switched:
        m.__class__ = KernelRoPE
    return switched


@contextmanager
def rope_kernel(model: nn.Module) -> Iterator[None]:
    """`use_rope_kernel` for the calls made inside the block, then `model` as it was: for a teacher that is
    the caller's live model (the graph built inside keeps the kernel; MLX evaluates it later)."""
    switched = use_rope_kernel(model)
    try:
        yield
    finally:
        for m in switched:
            m.__class__ = nn.RoPE
