"""The teacher's targets for the trainer: `targets_fn(indices, split, tokens)` for each batch.

Three sources, each a plain function of what it needs (no distiller): the teacher run online on every batch
(the default: its final hidden states, turned into logits chunk by chunk by the fused loss), top-k logits
cached on disk, and, for a teacher with another tokenizer, its logits at the positions aligned with the
student's tokenization. `kept_states` wraps the online source: a fixed example's states are computed once
and kept in memory, so that later epochs skip the teacher's forward pass (still exact, dense targets).

    targets_fn = online_targets(teacher, config, logits_width=None, lock=teacher_lock)
    targets = targets_fn([0, 1, 2], "train", padded_tokens)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import mlx.core as mx

from conch_dna.training.kd import kernels
from conch_dna.training.kd.config import KDConfig
from conch_dna.training.kd.cross_examples import pad_pairs
from conch_dna.training.kd.cross_vocab import CrossTargets
from conch_dna.training.kd.examples import Example, pad_batch
from conch_dna.training.kd.fused import TeacherStates, model_parts, parts_match, teacher_hidden
from conch_dna.training.kd.losses import SparseTargets
from conch_dna.training.kd.teacher_cache import TeacherCache, pad_sparse, teacher_logits

# targets_fn(indices into the data split, "train" | "val", padded tokens [B, L]) -> what the loss takes:
# the teacher's hidden states (`TeacherStates`), dense logits, `SparseTargets` or `CrossTargets`
TargetsFn = Callable[[list[int], str, mx.array], "TeacherStates | mx.array | SparseTargets | CrossTargets"]


def online_targets(teacher, config: KDConfig, logits_width: int | None = None, lock: threading.Lock | None = None,
                   prefetch: bool = False):
    """The teacher scores each batch as it comes. When its body and head split (`parts_match`) it stops at its
    final hidden states (`TeacherStates`) and the loss makes logits chunk by chunk; otherwise full logits,
    cut to the shared vocabulary `logits_width`. `lock` is held around the teacher (a live EGO model is shared).
    With `prefetch`, training batches are queued without waiting (the trainer evaluates them later)."""
    split_ok = parts_match(teacher)
    lock = lock or nullcontext()

    def online(idx, split, tokens):
        with lock:
            if split_ok:
                body, head = model_parts(teacher)
                # Prefetched (training batches): the pass is queued under the lock and runs after it is
                # released. Safe beside EGO: it reads the weights as they were (MLX arrays are immutable).
                wait = not (prefetch and split == "train")
                with kernels.teacher_kernels(teacher):
                    return TeacherStates(teacher_hidden(body, tokens, config.teacher_pass_tokens, wait), head)
            logits = teacher_logits(teacher, tokens)
            logits = logits[..., :logits_width] if logits_width is not None else logits
            mx.eval(logits)
        return mx.stop_gradient(logits)

    return online


def kept_states(online, examples: dict[str, Sequence[Example]]):
    """`online` (whose targets are `TeacherStates`), computed once per example and kept: the teacher is frozen,
    so its states for a fixed example never change, and a multi-epoch run (the main command's 30 steps of 4
    go over its 19 training answers 6 times) would otherwise repeat its forward pass every epoch (a quarter of a CPU step).

    Each example is run alone at its own length, so its states do not depend on which batch first needed it
    (a resumed run gets the same bits as an uninterrupted one). Batches are rebuilt by padding the kept rows
    with zeros: padded positions are masked out of the loss. Not for sequences that change between steps
    (on-policy answers): `examples[split][i]` must be what index i of that split always means."""
    kept: dict[tuple[str, int], mx.array] = {}
    head = None

    def targets(idx, split, tokens):
        nonlocal head
        rows = []
        for i in idx:
            if (split, i) not in kept:
                states = online([i], split, mx.array([examples[split][i].tokens]))
                head = states.head
                kept[(split, i)] = states.hidden[0]
                mx.eval(kept[(split, i)])
            rows.append(kept[(split, i)])
        width = tokens.shape[1]
        rows = [r[:width] if r.shape[0] >= width else mx.pad(r, [(0, width - r.shape[0]), (0, 0)]) for r in rows]
        return TeacherStates(mx.stack(rows), head)

    return targets


def kept_states_bytes(teacher, examples: dict[str, Sequence[Example]]) -> int | None:
    """What `kept_states` would hold once every example has been seen, at most: tokens x hidden width x 4
    bytes (read from the model's arguments, not by running it: a live teacher may be busy). None when the
    model does not say its width."""
    width = getattr(getattr(teacher, "args", None), "hidden_size", None)
    if not isinstance(width, int):
        return None
    return sum(len(e.tokens) for part in examples.values() for e in part) * width * 4


def cached_targets(cache: TeacherCache, train_idx: list[int], val_idx: list[int]):
    """Top-k logits written once with the teacher's answers (`teacher_targets = "cache"`); `train_idx` and
    `val_idx` map the trainer's split positions to the cache's examples."""
    split_index = {"train": train_idx, "val": val_idx}

    def from_cache(idx, split, tokens):
        return pad_sparse([cache.targets[split_index[split][i]] for i in idx], tokens.shape[1])

    return from_cache


def teacher_targets(teacher, config: KDConfig, cached: tuple[TeacherCache, list[int], list[int]] | None,
                    logits_width: int | None = None, *, lock: threading.Lock | None = None, prefetch: bool = False,
                    examples: dict[str, Sequence[Example]] | None = None):
    """The targets `config.teacher_targets` asks for, teacher and student sharing a tokenizer: `cached_targets`
    ("cache": `cached` is the cache and the indices of the training and validation examples in it) or
    `online_targets` ("online"); online states are kept (`kept_states`) when `examples` (the
    fixed "train" and "val" lists) are given, no sequence is written during training, the teacher's output
    splits into hidden states and a head, and their states fit `config.teacher_states_memory_gb`."""
    if config.teacher_targets == "cache":
        return cached_targets(*cached)
    online = online_targets(teacher, config, logits_width, lock=lock, prefetch=prefetch)
    if examples is None or config.on_policy_lambda > 0 or not parts_match(teacher):
        return online
    size = kept_states_bytes(teacher, examples)
    if size is None or size > config.teacher_states_memory_gb * 2**30:
        return online
    return kept_states(online, examples)


def cross_targets(teacher, config: KDConfig, train: list[Example], val: list[Example], vmap: dict,
                  lock: threading.Lock | None = None):
    """Different tokenizers: the teacher runs on its own tokenization of each example (`Example.teacher`) and
    only its rows at the aligned positions go through its output layer."""
    split_ok = parts_match(teacher)
    by_split = {"train": train, "val": val}
    lock = lock or nullcontext()

    def targets(idx, split, tokens):
        batch = [by_split[split][i] for i in idx]
        t_tokens, _ = pad_batch([e.teacher for e in batch])
        t_pos, s_pos, valid = pad_pairs(batch)
        with lock:
            if split_ok:
                body, head = model_parts(teacher)
                with kernels.teacher_kernels(teacher):
                    hidden = teacher_hidden(body, t_tokens, config.teacher_pass_tokens)
                rows = head(mx.take_along_axis(hidden, t_pos[..., None], axis=1))
            else:
                rows = mx.take_along_axis(teacher(t_tokens), t_pos[..., None], axis=1)
            rows = mx.stop_gradient(rows.astype(mx.float32))
            mx.eval(rows)
        return CrossTargets(rows, s_pos, valid, vmap)

    return targets


__all__ = ["cached_targets", "cross_targets", "kept_states", "kept_states_bytes", "online_targets", "teacher_targets"]
