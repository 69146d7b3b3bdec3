"""A tree of arrays as one float32 vector and back.

The trainer updates a LoRA student's parameters as one vector: a 24-block student with 4 adapted projections
has 192 small LoRA matrices, and clipping plus AdamW over them one by one queued ~1,900 kernels a step even
compiled, each a few microseconds of GPU work and about as much host time to queue. At a step's end the GPU
ran dry while the host queued them (H200, the 8 GB setting: 12-19 ms gaps each step; docs/design.md, "The update over one
vector"). Over one vector the update is a handful of kernels. The same layout packs a tree for one
collective (`distributed.all_sum_tree`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten


@dataclass(frozen=True)
class FlatLayout:
    """Where each array of a tree sits in the vector: its key (`tree_flatten`'s), shape and dtype, in order."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[mx.Dtype, ...]

    @classmethod
    def of(cls, tree) -> FlatLayout:
        leaves = tree_flatten(tree)
        return cls(tuple(k for k, _ in leaves), tuple(tuple(v.shape) for _, v in leaves), tuple(v.dtype for _, v in leaves))

    def sizes(self) -> list[int]:
        return [math.prod(shape) for shape in self.shapes]

    def flatten(self, tree) -> mx.array:
        """The tree's arrays (same keys and shapes as this layout's) as one float32 vector."""
        leaves = dict(tree_flatten(tree))
        if set(leaves) != set(self.keys):
            raise ValueError(f"the tree's arrays are not this layout's: {sorted(set(leaves) ^ set(self.keys))[:3]} ...")
        if wrong := next((k for k, shape in zip(self.keys, self.shapes) if tuple(leaves[k].shape) != shape), None):
            raise ValueError(f"{wrong} has shape {tuple(leaves[wrong].shape)}, this layout's is {self.shapes[self.keys.index(wrong)]}")
        return mx.concatenate([leaves[k].reshape(-1).astype(mx.float32) for k in self.keys])

    def unflatten(self, flat: mx.array):
        """The tree back from its vector: each array a view of the vector where its dtype is float32."""
        out, start = [], 0
        for key, shape, dtype, size in zip(self.keys, self.shapes, self.dtypes, self.sizes()):
            part = flat[start : start + size].reshape(shape)
            out.append((key, part if dtype == part.dtype else part.astype(dtype)))
            start += size
        return tree_unflatten(out)
