"""The optimizer step: AdamW over the LoRA parameters as one float32 vector (`flat.FlatLayout`), with
clipping and a guard that leaves everything as it was when the step's loss is not finite, decided on the
device. The optimizer's state is one vector per entry while training and per parameter in checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from conch_dna.training.kd.config import KDConfig
from conch_dna.training.kd.flat import FlatLayout


def build_optimizer(config: KDConfig) -> optim.Optimizer:
    # The distiller settles an unset learning rate by the adapter's start; called directly it is a zero start.
    lr, steps, warm = config.learning_rate_for(False), config.iters, min(config.warmup_steps, config.iters)
    main = steps - warm
    if config.lr_schedule == "cosine":
        schedule = optim.cosine_decay(lr, max(main, 1), lr * 0.1)
    elif config.lr_schedule == "linear":
        schedule = optim.linear_schedule(lr, lr * 0.1, max(main, 1))
    else:
        schedule = lr
    if warm:
        schedule = optim.join_schedules([optim.linear_schedule(lr / warm, lr, warm), schedule if callable(schedule) else (lambda _: lr)], [warm])
    return optim.AdamW(learning_rate=schedule, weight_decay=config.weight_decay)


# The key of the optimizer's state that holds its per-parameter entries (AdamW's m and v) as one vector each
# while training (`flat_optimizer_state`); checkpoints keep them per parameter (`per_parameter_state`).
FLAT_STATE_KEY = "flat_trainable_parameters"


def flat_optimizer_state(state: dict, layout: FlatLayout) -> dict:
    """`state` (an mlx optimizer's, per parameter) with each per-parameter entry gathered into one vector in
    `layout`'s order under FLAT_STATE_KEY; the rest (step, learning rate) as it was. As is if already flat."""
    if FLAT_STATE_KEY in state or not layout.keys:
        return state
    entries = dict(tree_flatten(state))
    first = layout.keys[0] + "."
    names = sorted(k[len(first):] for k in entries if k.startswith(first))
    flat = {}
    for name in names:
        named = FlatLayout(tuple(f"{k}.{name}" for k in layout.keys), layout.shapes, layout.dtypes)
        flat[name] = named.flatten({k: entries.pop(k) for k in named.keys})
    return {**tree_unflatten(list(entries.items())), FLAT_STATE_KEY: flat}


def per_parameter_state(state: dict, layout: FlatLayout) -> dict:
    """The inverse of `flat_optimizer_state`: the optimizer's state as mlx keeps it, per parameter."""
    if FLAT_STATE_KEY not in state:
        return state
    entries = dict(tree_flatten({k: v for k, v in state.items() if k != FLAT_STATE_KEY}))
    for name, vector in state[FLAT_STATE_KEY].items():
        entries.update((f"{k}.{name}", v) for k, v in tree_flatten(layout.unflatten(vector)))
    return tree_unflatten(list(entries.items()))


def make_update(model: nn.Module, optimizer: optim.Optimizer, max_grad_norm: float, compiled: bool) -> Callable:
    """update(grads_sum, loss_sum, n): the step's mean gradient (grads_sum / n, the flat gradient of
    `micro_batch_steps`), clipped to `max_grad_norm`, applied by the optimizer, unless `loss_sum` is not finite
    or `n` is 0: then parameters and optimizer state stay as they were (decided on the device, so the loop
    need not wait for the loss before it queues the update). Returns the gradient norm before clipping.

    The parameters and the optimizer's per-parameter state are updated as one vector each (`flat`: 12 kernels
    a step instead of ~1,900 for 192 LoRA matrices); the model's parameters are views of the vector. Compiled on
    GPUs. Build it after a resume has replaced `optimizer.state` and the adapter: it takes both as they are
    then (the optimizer's state becomes flat, `flat_optimizer_state`)."""
    layout = FlatLayout.of(model.trainable_parameters())
    optimizer.state = flat_optimizer_state(optimizer.state, layout)
    vector = {"params": layout.flatten(model.trainable_parameters())}

    def step(grads_sum, loss_sum, n):
        apply = mx.isfinite(loss_sum) & (n > 0)
        grads = grads_sum * (1.0 / n)
        norm = mx.sqrt(grads.square().sum())
        if max_grad_norm > 0:  # as mlx's optim.clip_grad_norm
            grads = grads * mx.minimum(max_grad_norm / (norm + 1e-6), 1.0)
        params, state = vector["params"], tree_map(lambda x: x, optimizer.state)
        new = optimizer.apply_gradients({FLAT_STATE_KEY: grads}, {FLAT_STATE_KEY: params})[FLAT_STATE_KEY]
        vector["params"] = mx.where(apply, new, params)
        _revert_where_refused(apply, optimizer.state, state)
        return norm

    if compiled:
        captured = [vector, optimizer.state]
        step = mx.compile(step, inputs=captured, outputs=captured)

    def update(grads_sum, loss_sum, n):
        norm = step(grads_sum, loss_sum, n)
        model.update(layout.unflatten(vector["params"]))
        return norm

    return update


def _revert_where_refused(apply: mx.array, tree, before) -> None:
    """In place (a compiled update keeps the optimizer's state objects): each array of `tree` becomes
    its new value where `apply`, the one in `before` otherwise. Entries the update added (an optimizer
    initialising its state after a resume) are kept."""
    for k in (tree if isinstance(tree, dict) else range(len(tree))):
        if isinstance(tree, dict) and k not in before:
            continue
        if isinstance(tree[k], (dict, list)):
            _revert_where_refused(apply, tree[k], before[k])
        elif isinstance(tree[k], mx.array):
            tree[k] = mx.where(apply, tree[k], before[k])
