"""CUDA kernels for the KD step, each with the portable path it replaces (CPU, Apple silicon, or
CONCH_FUSED_KERNEL=0): the fused loss's per-chunk elementwise work, SwiGLU and its backward, and RoPE.

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

BLOCK = 512  # threads per row; 151936 columns, 8 a load -> ~37 loads per thread per pass

# Shared by the kernels: ConchPack, N values moved by one load or store (16 bytes: VEC = 16 / the dtype's
# size), and the online log-sum-exp's merge.
_HEADER = r"""
template <typename T, int N> struct alignas(sizeof(T) * N) ConchPack { T v[N]; };

__device__ inline bool conch_aligned16(const void* p) { return reinterpret_cast<unsigned long long>(p) % 16 == 0; }

// (m, l[, a]): a running maximum m and sum(exp(x - m)) [and sum(exp(x - m) * w)]; a side with m = -inf is empty.
__device__ inline void conch_merge(float& m, float& l, float& a, float mo, float lo, float ao) {
    if (mo > m) { const float r = __expf(m - mo); l = l * r + lo; a = a * r + ao; m = mo; }
    else if (mo != -INFINITY) { const float r = __expf(mo - m); l += lo * r; a += ao * r; }
}
"""

_SOURCE = r"""
    const int row = blockIdx.x;
    const int tid = threadIdx.x;
    const int V = s_shape[1];
    const float T = temp[0], inv_t = 1.0f / T;
    const float wk = weights[2 * row];
    const float wc = weights[2 * row + 1];
    const int y = targets[row];
    const size_t base = (size_t)row * V;
    // 16-byte loads where the dtypes match (the Python side sets VEC), V divides and the buffers are aligned;
    // otherwise one value at a time. Columns [0, Vv) go by packs, [Vv, V) one by one.
    const int Vv = (VEC > 1 && conch_aligned16(s) && conch_aligned16(t) && conch_aligned16(g)) ? V : 0;

    if (wk == 0.f && wc == 0.f) {  // a masked row: no loss, zero gradient (even if its logits are inf)
        ConchPack<OutT, VEC> zero;
        for (int k = 0; k < VEC; ++k) zero.v[k] = static_cast<OutT>(0.f);
        for (int j = tid * VEC; j < Vv; j += BLOCK * VEC) *reinterpret_cast<ConchPack<OutT, VEC>*>(g + base + j) = zero;
        for (int j = Vv + tid; j < V; j += BLOCK) g[base + j] = static_cast<OutT>(0.f);
        if (tid == 0) { stats[2 * row] = 0.f; stats[2 * row + 1] = 0.f; }
        return;
    }

    // Pass 1 (one read): online log-sum-exp of s/T (ms, ls), t/T (mt, lt, with A = sum exp(t/T - mt) (t - s)/T)
    // and s (m1, l1). A group of values shares one rescale: its maximum first, then one exp per value.
    float ms = -INFINITY, ls = 0.f, mt = -INFINITY, lt = 0.f, A = 0.f, m1 = -INFINITY, l1 = 0.f, unused = 0.f;
    auto absorb = [&](const float* sv, const float* tv, int n) {
        float am = -INFINITY, bm = -INFINITY, xm = -INFINITY;
        for (int k = 0; k < n; ++k) { am = fmaxf(am, sv[k] * inv_t); bm = fmaxf(bm, tv[k] * inv_t); xm = fmaxf(xm, sv[k]); }
        // exp relative to a finite maximum (an all -inf group adds exp(-inf) = 0)
        const float ra = am == -INFINITY ? 0.f : am, rb = bm == -INFINITY ? 0.f : bm, rx = xm == -INFINITY ? 0.f : xm;
        float la = 0.f, lb = 0.f, ab = 0.f, lx = 0.f;
        for (int k = 0; k < n; ++k) {
            const float a = sv[k] * inv_t, b = tv[k] * inv_t;
            la += __expf(a - ra);
            const float e = __expf(b - rb);
            lb += e; ab += e * (b - a);
            lx += __expf(sv[k] - rx);
        }
        conch_merge(ms, ls, unused, am, la, 0.f);
        conch_merge(mt, lt, A, bm, lb, ab);
        conch_merge(m1, l1, unused, xm, lx, 0.f);
    };
    for (int j = tid * VEC; j < Vv; j += BLOCK * VEC) {
        const ConchPack<OutT, VEC> ps = *reinterpret_cast<const ConchPack<OutT, VEC>*>(s + base + j);
        const ConchPack<OutT, VEC> pt = *reinterpret_cast<const ConchPack<OutT, VEC>*>(t + base + j);
        float sv[VEC], tv[VEC];
        for (int k = 0; k < VEC; ++k) { sv[k] = static_cast<float>(ps.v[k]); tv[k] = static_cast<float>(pt.v[k]); }
        absorb(sv, tv, VEC);
    }
    for (int j = Vv + tid; j < V; j += BLOCK) {
        const float sv = static_cast<float>(s[base + j]), tv = static_cast<float>(t[base + j]);
        absorb(&sv, &tv, 1);
    }

    // The block's merge: within each warp by shuffles, then the warps' results in warp 0.
    __shared__ float sh[7][BLOCK / 32];
    for (int round = 0; round < 2; ++round) {
        for (int off = 16; off > 0; off >>= 1) {
            const float o0 = __shfl_xor_sync(0xffffffff, ms, off), o1 = __shfl_xor_sync(0xffffffff, ls, off);
            const float o2 = __shfl_xor_sync(0xffffffff, mt, off), o3 = __shfl_xor_sync(0xffffffff, lt, off);
            const float o4 = __shfl_xor_sync(0xffffffff, A, off);
            const float o5 = __shfl_xor_sync(0xffffffff, m1, off), o6 = __shfl_xor_sync(0xffffffff, l1, off);
            conch_merge(ms, ls, unused, o0, o1, 0.f);
            conch_merge(mt, lt, A, o2, o3, o4);
            conch_merge(m1, l1, unused, o5, o6, 0.f);
        }
        if (round == 1) break;
        const int warp = tid / 32, lane = tid % 32;
        if (lane == 0) {
            sh[0][warp] = ms; sh[1][warp] = ls; sh[2][warp] = mt; sh[3][warp] = lt; sh[4][warp] = A;
            sh[5][warp] = m1; sh[6][warp] = l1;
        }
        __syncthreads();
        const bool has = lane < BLOCK / 32;
        ms = has ? sh[0][lane] : -INFINITY; ls = has ? sh[1][lane] : 0.f;
        mt = has ? sh[2][lane] : -INFINITY; lt = has ? sh[3][lane] : 0.f; A = has ? sh[4][lane] : 0.f;
        m1 = has ? sh[5][lane] : -INFINITY; l1 = has ? sh[6][lane] : 0.f;
    }
    // After the second round every warp holds the whole row's (each merged the same per-warp values).
    const float lse_q = ms + __logf(ls);
    const float lse_p = mt + __logf(lt);
    const float lse_1 = m1 + __logf(l1);
    if (tid == 0) {
        stats[2 * row] = T * T * fmaxf(A / lt - lse_p + lse_q, 0.f);
        stats[2 * row + 1] = lse_1 - static_cast<float>(s[base + y]);
    }

    // Pass 2 (one read, one write): dL/ds_j = wk T (q_j - p_j) + wc (softmax(s)_j - [j == y]).
    const float gk = wk * T;
    auto grad = [&](float sv, float tv, int j) {
        const float q = __expf(sv * inv_t - lse_q), p = __expf(tv * inv_t - lse_p), sm = __expf(sv - lse_1);
        return gk * (q - p) + wc * (sm - (j == y ? 1.f : 0.f));
    };
    for (int j = tid * VEC; j < Vv; j += BLOCK * VEC) {
        const ConchPack<OutT, VEC> ps = *reinterpret_cast<const ConchPack<OutT, VEC>*>(s + base + j);
        const ConchPack<OutT, VEC> pt = *reinterpret_cast<const ConchPack<OutT, VEC>*>(t + base + j);
        ConchPack<OutT, VEC> out;
        for (int k = 0; k < VEC; ++k)
            out.v[k] = static_cast<OutT>(grad(static_cast<float>(ps.v[k]), static_cast<float>(pt.v[k]), j + k));
        *reinterpret_cast<ConchPack<OutT, VEC>*>(g + base + j) = out;
    }
    for (int j = Vv + tid; j < V; j += BLOCK)
        g[base + j] = static_cast<OutT>(grad(static_cast<float>(s[base + j]), static_cast<float>(t[base + j]), j));
"""


def _enabled() -> bool:
    return os.environ.get("CONCH_FUSED_KERNEL", "1") != "0"


def numpy_available() -> bool:
    """True on the CPU device (unless CONCH_FUSED_KERNEL=0)."""
    return _enabled() and mx.default_device() == mx.cpu


def on_cuda() -> bool:
    """True where the default device is a GPU of MLX's CUDA backend."""
    try:
        return mx.default_device() == mx.gpu and mx.cuda.is_available()
    except AttributeError:  # an MLX without the cuda module
        return False


def available() -> bool:
    """True where the fused kernel can run: MLX's CUDA backend on the default (GPU) device.
    CONCH_FUSED_KERNEL=0 turns it off (the portable path then runs everywhere: for comparisons)."""
    return _enabled() and on_cuda()


@lru_cache(maxsize=1)
def _kernel():
    return mx.fast.cuda_kernel(
        name="conch_forward_kl_ce_rows",
        input_names=["s", "t", "targets", "weights", "temp"],
        output_names=["g", "stats"],
        source=_SOURCE,
        header=f"#define BLOCK {BLOCK}\n" + _HEADER,
    )


def forward_kl_ce_rows(s: mx.array, t: mx.array, targets: mx.array, wk: mx.array, wc: mx.array,
                       temperature: float) -> tuple[mx.array, mx.array, mx.array]:
    """(dL/ds [C, V] in s's dtype, KD per row [C] (T^2-scaled), CE per row [C]) for one chunk."""
    rows, vocab = s.shape
    vec = 16 // s.dtype.size if s.dtype == t.dtype and 16 % s.dtype.size == 0 else 1
    vec = vec if vocab % vec == 0 else 1
    weights = mx.stack([wk.astype(mx.float32), wc.astype(mx.float32)], axis=-1)
    g, stats = _kernel()(
        inputs=[s, t, targets.astype(mx.int32), weights, mx.array([float(temperature)], dtype=mx.float32)],
        template=[("OutT", s.dtype), ("VEC", vec)],
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


# SwiGLU, silu(gate) * up, and its gradients: elementwise over [tokens, intermediate], so memory-bound; VEC values
# a thread through 16-byte loads (one at a time where the size does not divide or a buffer is misaligned), the
# sigmoid in float32. MLX's compiled forward and our first one-value-a-thread backward moved 2.4-3.1 TB/s of an
# H200's 4.8 (`benchmarks/bench_kd.py --kernels`); this version's effect on the step was within a single run's
# resolution.
_SWIGLU_FORWARD = r"""
    const float g = static_cast<float>(gate[i]), u = static_cast<float>(up[i]);
    out[i] = static_cast<T>(g / (1.0f + __expf(-g)) * u);
"""
_SWIGLU_BACKWARD = r"""
    const float g = static_cast<float>(gate[i]), u = static_cast<float>(up[i]), d = static_cast<float>(dy[i]);
    const float sig = 1.0f / (1.0f + __expf(-g));
    d_gate[i] = static_cast<T>(d * u * sig * (1.0f + g * (1.0f - sig)));
    d_up[i] = static_cast<T>(d * g * sig);
"""


def _elementwise_source(body: str, inputs: list[str], outputs: list[str]) -> str:
    """`body` (reading `name[i]`, writing `name[i]`) over N values: by packs of VEC from 16-byte loads where every
    buffer is aligned, else one by one; a grid-stride loop either way."""
    names = inputs + outputs
    aligned = " && ".join(f"conch_aligned16({n})" for n in names)
    loads = "\n".join(f"        ConchPack<T, VEC> {n}_p = *reinterpret_cast<const ConchPack<T, VEC>*>({n} + VEC * n);"
                      for n in inputs)
    decls = "\n".join(f"        ConchPack<T, VEC> {n}_p;" for n in outputs)
    stores = "\n".join(f"        *reinterpret_cast<ConchPack<T, VEC>*>({n} + VEC * n) = {n}_p;" for n in outputs)
    packed_body = body
    for n in names:
        packed_body = packed_body.replace(f"{n}[i]", f"{n}_p.v[i]")
    return f"""
    const size_t stride = size_t(gridDim.x) * blockDim.x, first = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (VEC > 1 && {aligned}) {{
      for (size_t n = first; n < N / VEC; n += stride) {{
{loads}
{decls}
        for (int i = 0; i < VEC; ++i) {{ {packed_body} }}
{stores}
      }}
    }} else {{
      for (size_t i = first; i < N; i += stride) {{ {body} }}
    }}
"""


@lru_cache(maxsize=1)
def _swiglu_kernels():
    return (mx.fast.cuda_kernel(name="conch_swiglu", input_names=["gate", "up"], output_names=["out"],
                                source=_elementwise_source(_SWIGLU_FORWARD, ["gate", "up"], ["out"]), header=_HEADER),
            mx.fast.cuda_kernel(name="conch_swiglu_backward", input_names=["gate", "up", "dy"],
                                output_names=["d_gate", "d_up"], header=_HEADER,
                                source=_elementwise_source(_SWIGLU_BACKWARD, ["gate", "up", "dy"], ["d_gate", "d_up"])))


def _elementwise(kernel, inputs: list[mx.array], outputs: int) -> list[mx.array]:
    x = inputs[0]
    n = x.size
    vec = 16 // x.dtype.size if 16 % x.dtype.size == 0 and n % (16 // x.dtype.size) == 0 else 1
    threads = min(-(-n // vec), 132 * 2048)  # a grid-stride loop: about one wave of an H200's threads at most
    return kernel(inputs=inputs, template=[("T", x.dtype), ("N", n), ("VEC", vec)],
                  grid=(-(-threads // 256) * 256, 1, 1), threadgroup=(256, 1, 1),
                  output_shapes=[x.shape] * outputs, output_dtypes=[x.dtype] * outputs)


def swiglu_forward(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up in one pass (CUDA; `available()`), the sigmoid in float32."""
    return _elementwise(_swiglu_kernels()[0], [gate, up.astype(gate.dtype)], 1)[0]


def swiglu_backward(gate: mx.array, up: mx.array, dy: mx.array) -> tuple[mx.array, mx.array]:
    """The gradients of silu(gate) * up in one pass over gate, up and dy (CUDA; `available()`), the sigmoid
    recomputed in float32."""
    d_gate, d_up = _elementwise(_swiglu_kernels()[1], [gate, up.astype(gate.dtype), dy.astype(gate.dtype)], 2)
    return d_gate, d_up


@mx.custom_function
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, whose gradient recomputes sigmoid(gate) from `gate` rather than keeping silu(gate) and
    sigmoid(gate) (fewer [tokens, intermediate] activations kept). Each way one kernel on NVIDIA GPUs
    (`available()`): MLX's compile splits the backward's ops into three plus float32 copies."""
    return swiglu_forward(gate, up) if available() else nn.silu(gate) * up


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    gate, up = primals
    if available():
        return swiglu_backward(gate, up, cotangent)
    sig = mx.sigmoid(gate)
    return cotangent * up * sig * (1 + gate * (1 - sig)), cotangent * gate * sig


def is_swiglu_mlp(module: nn.Module) -> bool:
    """Is `module` an mlx-lm MLP computing exactly `down_proj(swiglu(gate_proj(x), up_proj(x)))` (most of its
    dense architectures)? Its code names those attributes and no others, and its `swiglu` is mlx-lm's."""
    from mlx_lm.models.activations import swiglu as mlx_lm_swiglu

    call = type(module).__call__
    code = getattr(call, "__code__", None)
    return (code is not None and code.co_names == ("down_proj", "swiglu", "gate_proj", "up_proj")
            and getattr(call, "__globals__", {}).get("swiglu") is mlx_lm_swiglu)


@cache
def swiglu_mlp_class(cls: type) -> type:
    """`cls` (an `is_swiglu_mlp` class) computing its SwiGLU by `swiglu`."""
    def __call__(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))

    return type(f"Recomputing{cls.__name__}", (cls,), {"__call__": __call__})


# RoPE (mlx-lm's default, non-traditional: the two halves of each head rotated). MLX's CUDA kernel spent 44 us
# a call on a [8, 12, 1024, 128] bf16 view (the teacher's queries, still in [B, L, H, D] memory after the
# transpose): 8.4 of a 134 ms batch-8 KD step on an H200 (`bench_kd.py --kernels`). Here one thread takes V
# neighbouring frequencies of one position through all H heads (H a constant: the loop unrolls, every load is
# issued at once), V values per load where the layout allows. The angle is computed as MLX does
# (mlx/backend/cuda/rope.cu), for the same bits (float32: every value equal on the H200). That step's RoPE
# time: ~4.5-5 ms (`bench_kd.py --kernels`). The output keeps the input's usual memory layout,
# [B, L, H, D] (what the attention reads and the gradient reshapes back into), returned as a [B, H, L, D] view.
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
                        && reinterpret_cast<unsigned long long>(x) % sizeof(ConchPack<T, V>) == 0;
    T* o = out + bl * H * (2 * HALF) + i0;
#pragma unroll
    for (int h = 0; h < H; ++h) {
        ConchPack<T, V> a, b2, r1, r2;
        if (packed) {
            a = *reinterpret_cast<const ConchPack<T, V>*>(x + in0 + h * s1);
            b2 = *reinterpret_cast<const ConchPack<T, V>*>(x + in0 + h * s1 + HALF);
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
        *reinterpret_cast<ConchPack<T, V>*>(o + h * (2 * HALF)) = r1;
        *reinterpret_cast<ConchPack<T, V>*>(o + h * (2 * HALF) + HALF) = r2;
    }
"""


@lru_cache(maxsize=1)
def _rope_kernel():
    return mx.fast.cuda_kernel(name="conch_rope", input_names=["x", "params"], output_names=["out"], source=_ROPE,
                               header=_HEADER, ensure_row_contiguous=False)


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
def teacher_kernels(model: nn.Module) -> Iterator[None]:
    """Inside the block, `model`'s RoPE (`use_rope_kernel`) and, on NVIDIA GPUs, its SwiGLU MLPs
    (`swiglu_mlp_class`: one kernel a call) run this module's kernels; then `model` is as it was. For a
    teacher's forward pass: that is the caller's live model (the graph built inside keeps the kernels; MLX
    evaluates it later)."""
    switched = [(m, nn.RoPE) for m in use_rope_kernel(model)]
    if available():
        for m in model.modules():
            if is_swiglu_mlp(m):
                switched.append((m, type(m)))
                m.__class__ = swiglu_mlp_class(type(m))
    try:
        yield
    finally:
        for m, cls in switched:
            m.__class__ = cls
