"""Data parallelism over MLX's own engine, `mx.distributed` (ring over TCP, MPI, NCCL), launched with
`mlx.launch`. Without a launcher the group has one member and everything below is a no-op.

    mlx.launch --backend ring -n 2 -- python -m conch_dna.training.kd --domain thinking   # one machine
    mlx.launch --backend ring --hostfile hosts.json -- python -m conch_dna.training.kd --all  # several

Each process takes its shard (examples rank, rank + size, ...) of every global batch; the token-weighted
gradient sums, token counts and loss sums are all-summed, so the update equals one process's on the whole
batch (up to float summation order). Every process keeps identical weights; only rank 0 writes files
(teacher cache, checkpoints, adapter, metrics, registry) and emits signals; the others wait at barriers.
Several hosts need the output folder on a shared filesystem.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from functools import lru_cache

import mlx.core as mx

from conch_dna.training.kd.flat import FlatLayout

_solo = threading.local()


@lru_cache(maxsize=1)
def group():
    return mx.distributed.init()


def rank() -> int:
    return 0 if getattr(_solo, "on", False) else group().rank()


def size() -> int:
    return 1 if getattr(_solo, "on", False) else group().size()


@contextmanager
def solo():
    """Inside, this process trains alone (no gradient exchange) and writes its own outputs: used when
    `distill_all` spreads whole domains over the processes instead of splitting each batch."""
    _solo.on = True
    try:
        yield
    finally:
        _solo.on = False


def world_barrier() -> None:
    """A barrier over all launched processes, even inside `solo()`."""
    if group().size() > 1:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group()))


def is_writer() -> bool:
    return rank() == 0


def all_sum_tree(tree):
    """The tree's arrays summed over the processes, in one collective: the leaves are flattened into one
    buffer and split back (as mlx-lm's `average_gradients` does), not one `all_sum` per leaf."""
    if size() == 1:
        return tree
    layout = FlatLayout.of(tree)
    if not layout.keys:
        return tree
    return layout.unflatten(mx.distributed.all_sum(layout.flatten(tree)))


def barrier() -> None:
    if size() > 1:
        mx.eval(mx.distributed.all_sum(mx.array(1.0)))
