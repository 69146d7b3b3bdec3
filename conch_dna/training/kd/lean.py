"""Less memory in the student's backward pass, for the same values: gradient checkpointing per block (whole
blocks, or only their MLPs, or a mix) and the lean backward (frozen norms without weight gradients, SwiGLU
recomputing its sigmoid). `memory.py` estimates what each setting keeps; the trainer applies them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import mlx.core as mx
import mlx.nn as nn
import structlog

from conch_dna.training.kd import kernels
from conch_dna.training.kd.config import KDConfig

log = structlog.get_logger(__name__)


def checkpoint_blocks(model: nn.Module, every: int = 1, scope: str = "block", whole: int = 0) -> int:
    """Gradient checkpointing: blocks 0, every, 2 * every, ... recompute their activations in the backward
    pass (`mx.checkpoint`) instead of keeping them; returns how many. scope "block" recomputes the whole
    block; "mlp" only its feed-forward part (`block.mlp`), whose [tokens, intermediate] activations are
    most of what a block keeps, for the price of its matmuls alone (no attention, norms or LoRA recomputed);
    with "mlp", the first `whole` of the picked blocks are recomputed whole all the same: a memory between the
    two scopes, one block at a time. Per instance, by switching the module's class: mlx-lm's
    `grad_checkpoint` patches the block class itself, which a teacher of the same architecture (and every
    later model in the process) shares."""
    kinds = block_kinds(len(model.layers), every, scope, whole)
    mlp_blocks = [b for b, kind in zip(model.layers, kinds) if kind == "mlp"]
    if no_mlp := [type(b).__name__ for b in mlp_blocks if not isinstance(getattr(b, "mlp", None), nn.Module)]:
        raise ValueError(f"grad_checkpoint_scope='mlp' needs blocks with an `mlp` sub-module; {no_mlp[0]} has "
                         "none: use grad_checkpoint_scope='block'")
    for module in [b for b, kind in zip(model.layers, kinds) if kind == "whole"] + [b.mlp for b in mlp_blocks]:
        if not getattr(type(module), "_conch_checkpointed", False):
            module.__class__ = _checkpointed_class(type(module))
    return len(kinds) - kinds.count("plain")


def block_kinds(layers: int, every: int = 1, scope: str = "block", whole: int = 0) -> list[str]:
    """What `checkpoint_blocks` does to each block, first to last: "plain" (keeps its activations), "mlp"
    (recomputes its MLP) or "whole" (recomputes all of it)."""
    if scope not in ("block", "mlp"):
        raise ValueError(f"grad_checkpoint_scope must be 'block' or 'mlp', not {scope!r}")
    kinds = ["plain"] * layers
    picked = range(0, layers, every)
    for n, i in enumerate(picked):
        kinds[i] = "whole" if scope == "block" or n < whole else "mlp"
    return kinds


def block_kinds_for(config: KDConfig, layers: int) -> list[str]:
    """`block_kinds` under `config`'s checkpointing settings (every block "plain" without grad_checkpoint)."""
    if not config.grad_checkpoint:
        return ["plain"] * layers
    return block_kinds(layers, config.grad_checkpoint_every, config.grad_checkpoint_scope, config.grad_checkpoint_whole_blocks)


def checkpoint_setting(config: KDConfig) -> str | None:
    """The checkpointing a config asks for, in words ("mlp every 1, first 6 whole"), or None."""
    if not config.grad_checkpoint:
        return None
    whole = config.grad_checkpoint_scope == "mlp" and config.grad_checkpoint_whole_blocks
    return f"{config.grad_checkpoint_scope} every {config.grad_checkpoint_every}" + (f", first {whole} whole" if whole else "")


def lean_backward(model: nn.Module, norms: bool = True, mlps: bool = True) -> dict[str, int]:
    """Two rewrites of a LoRA student's frozen parts so that its backward pass computes and keeps only what the
    LoRA gradients need (same forward values; returns how many modules of each kind were rewritten):

    - RMSNorms with a frozen weight take the gradient of normalising without it and multiplying by it
      afterwards (`_rms_norm_frozen_weight`; the forward is MLX's fused norm, same values). MLX's RMSNorm backward
      always computes the weight's gradient, a [tokens, D] product summed over tokens that nobody reads when
      the weight is frozen: on an H200 those sums were 5.7 of a Qwen2.5-0.5B student's 53 ms forward +
      backward (8 x 1024 tokens; `benchmarks/profile_student.py --kernels`).
    - SwiGLU MLPs (mlx-lm's `down_proj(swiglu(gate_proj(x), up_proj(x)))`, most of its dense architectures)
      use `kernels.swiglu`, whose backward recomputes the sigmoid instead of keeping silu(gate) and
      sigmoid(gate): fewer [tokens, intermediate] activations kept per block (one measured on the CPU; on an
      H200 the step's peak fell 2.3 GB at batch 8 x 1024, about 1.2 of them), and its forward one kernel.

    Per instance, by switching the module's class, like `checkpoint_blocks`."""
    counts = {"norms": 0, "mlps": 0}
    for module in model.modules():
        if norms and type(module) is nn.RMSNorm and "weight" not in module.trainable_parameters():
            module.__class__, counts["norms"] = _RMSNormWeightAfter, counts["norms"] + 1
        elif mlps and kernels.is_swiglu_mlp(module):
            module.__class__, counts["mlps"] = kernels.swiglu_mlp_class(type(module)), counts["mlps"] + 1
    return counts


class _RMSNormWeightAfter(nn.RMSNorm):
    def __call__(self, x):
        return _rms_norm_frozen_weight(self.eps)(x, self.weight)


@cache
def _rms_norm_frozen_weight(eps: float) -> Callable:
    """f(x, w): the values of `mx.fast.rms_norm(x, w, eps)` (one kernel), with the gradient of
    `mx.fast.rms_norm(x, None, eps) * w` with respect to x only (MLX's weightless norm backward): the forward of
    that product and this are the same bits (x * r rounded, then times w rounded), so only the separate
    multiply goes (on an H200 one [tokens, D] kernel per norm call, 2.8 ms of a batch-16 step's 249)."""

    @mx.custom_function
    def f(x, w):
        return mx.fast.rms_norm(x, w, eps)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        x, w = primals
        _, (dx,) = mx.vjp(lambda a: mx.fast.rms_norm(a, None, eps), [x], [cotangent * w])
        return dx, mx.zeros_like(w)  # the weight is frozen: its gradient is never read

    return f


@cache
def _checkpointed_class(cls: type) -> type:
    call = cls.__call__

    def __call__(self, *args, **kwargs):
        def inner(params, *args, **kwargs):
            self.update(params)  # the tracers of the trainable parameters, so they get gradients
            return call(self, *args, **kwargs)

        return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

    return type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__, "_conch_checkpointed": True})


def use_lean_backward(config: KDConfig) -> bool:
    """lean_backward "auto": on a GPU only. On 2 CPU cores (smollm2 preset, trainer) it measured 41.5 / 34.1
    tokens/s against 39.8 / 40.1 without: nothing to gain where memory is not scarce."""
    return config.lean_backward == "on" or (config.lean_backward == "auto" and mx.default_device() == mx.gpu)
