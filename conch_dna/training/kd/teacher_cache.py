"""The teacher's cached targets: fingerprints of models and tokenizers that key the cache, the teacher's
top-k logits, ids and row log-sum-exp stored in safetensors shards (`TeacherCache`), read back as
`SparseTargets`.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import nullcontext
from pathlib import Path

import mlx.core as mx
import numpy as np
import structlog

from conch_dna.atomic import atomic_folder, sha256_file
from conch_dna.neuron import DataError
from conch_dna.training.kd.examples import Example, pad_batch
from conch_dna.training.kd.losses import SparseTargets

log = structlog.get_logger(__name__)


def fingerprint_model(model) -> str:
    """A cheap content fingerprint of a loaded model: shapes plus per-tensor sums (computed on device)."""
    from mlx.utils import tree_flatten

    h = hashlib.sha256()
    for name, p in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        x = p.astype(mx.float32)
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(np.array(mx.stack([x.sum(), (x * x).sum()])).tobytes())
    return h.hexdigest()


def fingerprint_tokenizer(tokenizer) -> str:
    tok = getattr(tokenizer, "_tokenizer", tokenizer)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps([vocab, getattr(tokenizer, "chat_template", None)]).encode()).hexdigest()


def cache_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def teacher_logits(model, tokens: mx.array) -> mx.array:
    return model(tokens).astype(mx.float32)


def compute_sparse_targets(model, examples: list[Example], top_k: int, batch_size: int = 8, lock=None) -> list[SparseTargets]:
    """Run the teacher over each example and keep top-k logits, ids and the row log-sum-exp per token."""
    from conch_dna.training.kd.losses import topk_targets

    out = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        tokens, _ = pad_batch(chunk)
        with lock or nullcontext():
            t = topk_targets(teacher_logits(model, tokens), top_k)
            mx.eval(t)
        for i, e in enumerate(chunk):
            n = len(e.tokens)
            out.append(SparseTargets(t.logits[i, :n], t.indices[i, :n], t.logsumexp[i, :n]))
    return out


def tail_logsumexp(t: SparseTargets) -> mx.array:
    """log of the teacher's (unnormalised) mass outside the top-k, in float32, from exact values."""
    lse_k = mx.logsumexp(t.logits.astype(mx.float32), axis=-1)
    frac = mx.minimum(mx.exp(lse_k - t.logsumexp), 1.0 - 2.0**-23)  # floored as in losses._sparse_logprobs
    return (t.logsumexp + mx.log1p(-frac)).astype(mx.float32)


class TeacherCache:
    """Examples and their top-k teacher targets, stored as safetensors shards in one folder.

    Logits are stored as float16 (half the bytes; a logit needs no more), ids as uint16 when the
    vocabulary fits (else int32). Instead of the full-row log-sum-exp we store the log-sum-exp of the
    *tail* (float32): the tail holds ~1e-3 of the mass, far below float16's resolution of the top-k
    probabilities, so 1 - sum(top-k) recomputed from rounded logits would be noise. The folder is written to a temporary sibling and
    renamed, so a cache is either complete or absent.
    """

    SHARD_EXAMPLES = 256

    def __init__(self, examples: list[Example], targets: list[SparseTargets], meta: dict):
        self.examples, self.targets, self.meta = examples, targets, meta

    def save(self, folder: Path) -> Path:
        vocab = self.meta.get("vocab_size", 1 << 31)
        id_dtype = mx.uint16 if vocab <= 65536 else mx.int32
        n_shards = max(1, math.ceil(len(self.examples) / self.SHARD_EXAMPLES))
        with atomic_folder(folder) as tmp:
            for s in range(n_shards):
                lo, hi = s * self.SHARD_EXAMPLES, (s + 1) * self.SHARD_EXAMPLES
                ex, tg = self.examples[lo:hi], self.targets[lo:hi]
                arrays = {
                    "tokens": mx.array(np.concatenate([np.array(e.tokens, np.int32) for e in ex])),
                    "lengths": mx.array([len(e.tokens) for e in ex], dtype=mx.int32),
                    "prompt_lens": mx.array([e.prompt_len for e in ex], dtype=mx.int32),
                }
                if tg:  # online training stores the teacher's answers only
                    arrays["logits"] = mx.concatenate([t.logits for t in tg]).astype(mx.float16)
                    arrays["indices"] = mx.concatenate([t.indices for t in tg]).astype(id_dtype)
                    arrays["tail_logsumexp"] = mx.concatenate([tail_logsumexp(t) for t in tg])
                mx.save_safetensors(str(tmp / f"shard-{s:05d}.safetensors"), arrays)
            digests = [sha256_file(tmp / f"shard-{i:05d}.safetensors") for i in range(n_shards)]
            (tmp / "meta.json").write_text(json.dumps({**self.meta, "shards": n_shards, "examples": len(self.examples),
                                                       "prompts": [e.prompt for e in self.examples],
                                                       "sha256": digests}, indent=2))
        return Path(folder)

    @classmethod
    def load(cls, folder: Path) -> TeacherCache:
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text())
        examples, targets = [], []
        prompts = iter(meta.get("prompts") or [])
        for s in range(meta["shards"]):
            path = folder / f"shard-{s:05d}.safetensors"
            digests = meta.get("sha256")
            if digests and sha256_file(path) != digests[s]:
                raise DataError(f"teacher cache shard {path} is corrupt (sha256 mismatch); delete {folder} to rebuild it")
            try:
                a = mx.load(str(path))
            except Exception as e:
                raise DataError(f"teacher cache shard {path} is unreadable ({e}); delete {folder} to rebuild it") from e
            lengths = np.array(a["lengths"]).tolist()
            prompt_lens = np.array(a["prompt_lens"]).tolist()
            tokens = np.array(a["tokens"])
            off = 0
            for n, p in zip(lengths, prompt_lens):
                examples.append(Example(tuple(int(t) for t in tokens[off : off + n]), int(p), next(prompts, "")))
                if "logits" not in a:
                    off += n
                    continue
                top = a["logits"][off : off + n].astype(mx.float32)
                # The full-row logsumexp, rebuilt from the *rounded* top-k and the exact tail: the tail
                # mass the loss derives from it is then exact, whatever float16 did to the top-k.
                lse = mx.logaddexp(mx.logsumexp(top, axis=-1), a["tail_logsumexp"][off : off + n])
                targets.append(SparseTargets(top, a["indices"][off : off + n].astype(mx.int32), lse))
                off += n
        if len(examples) != meta["examples"] or len(targets) not in (0, len(examples)):
            raise DataError(f"teacher cache {folder} is incomplete ({len(examples)} of {meta['examples']} examples); delete it to rebuild")
        return cls(examples, targets, meta)

    def bytes_per_token(self) -> float:
        k = self.targets[0].logits.shape[-1] if self.targets else 0
        id_bytes = 2 if self.meta.get("vocab_size", 1 << 31) <= 65536 else 4
        return k * (2 + id_bytes) + 4


def pad_sparse(targets: list[SparseTargets], width: int) -> SparseTargets:
    """Stack per-example sparse targets into [B, width, k], padding with neutral rows (masked anyway)."""
    k = targets[0].logits.shape[-1]
    rows_l, rows_i, rows_z = [], [], []
    for t in targets:
        pad = width - t.logits.shape[0]
        rows_l.append(mx.pad(t.logits, [(0, pad), (0, 0)]))
        rows_i.append(mx.pad(t.indices, [(0, pad), (0, 0)]) if pad else t.indices)
        # Padding rows: logits 0 with logsumexp log(k) describe a valid (uniform-over-top-k) distribution.
        rows_z.append(mx.concatenate([t.logsumexp, mx.full((pad,), math.log(k))]) if pad else t.logsumexp)
    indices = mx.stack(rows_i)
    if k > 1:  # padding rows need distinct ids, or take/put_along_axis would collide
        pad_ids = mx.broadcast_to(mx.arange(k, dtype=indices.dtype), indices.shape)
        valid = mx.arange(width)[None, :, None] < mx.array([t.logits.shape[0] for t in targets])[:, None, None]
        indices = mx.where(valid, indices, pad_ids)
    return SparseTargets(mx.stack(rows_l), indices, mx.stack(rows_z))
