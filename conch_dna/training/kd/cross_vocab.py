"""Distillation between a teacher and a student with different tokenizers.

Token id 500 is a different string in each vocabulary, so logits cannot be sliced or projected into each
other. The method here (close to GOLD, Patiño et al. 2025, and ULD, Boizard et al. 2024):

1. Sequence alignment. The teacher's response text is tokenized by both tokenizers; every token carries
   its character span. A character offset c where both token sequences have a boundary is a place where
   both models predict "the text from c on": the teacher's logits at its token ending at c and the
   student's at its token ending at c are compared (plus the start of the response, and the end, where
   both predict their end-of-sequence token).
2. Vocabulary mapping. Tokens whose strings are the same bytes (after undoing the byte-level alphabet or
   SentencePiece's "▁" and <0xNN> pieces) are paired one to one. On the paired tokens the divergence is
   computed exactly, on the distributions coarse-grained to {each paired token} + {everything else}: that
   is a true divergence (0 only when the paired probabilities and the remainder mass agree).
3. The remainder. Inside "everything else" the tokens have no counterpart, so their probabilities are
   compared as sorted lists (ULD: L1 distance of the top-k sorted probabilities), which needs no mapping.

`coverage` figures say how much of this is exact: the share of the teacher's probability mass on paired
tokens, and the share of response positions that align.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from conch_dna.neuron import eos_id, hf_tokenizer
from conch_dna.training.kd.losses import (
    DEFAULT_LOSS,
    LossSpec,
    _divergence_from_logprobs,
    masked_mean,
    next_token_view,
    token_cross_entropy,
)
from conch_dna.training.kd.vocab import (
    PROBE_TEXTS,
    VocabMismatchError,
    _vocab_of,
    check_same_tokenizer,
    tokenizer_vocab_size,
)

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class CrossTokenizerError(VocabMismatchError):
    """The tokenizers cannot be aligned (no offsets, unknown token alphabet); the message says why."""


# ----------------------------------------------------------------------------------------- detection


def compare_tokenizers(teacher_tokenizer, student_tokenizer, probes=PROBE_TEXTS) -> dict:
    """Decide how two tokenizers relate, with the figures behind the decision.

    "identical": same vocabulary and same encodings of every probe text.
    "padded": every id both have is the same string and the probes encode the same; only the number of
              (added) tokens differs, so logits can be sliced/padded to the real vocabulary.
    "different": anything else; distillation needs the mapped strategy.
    """
    tv, sv = _vocab_of(teacher_tokenizer), _vocab_of(student_tokenizer)
    t_inv, s_inv = {i: t for t, i in tv.items()}, {i: t for t, i in sv.items()}
    shared = set(t_inv) & set(s_inv)
    same_ids = sum(t_inv[i] == s_inv[i] for i in shared)
    same_probes = sum(list(teacher_tokenizer.encode(p)) == list(student_tokenizer.encode(p)) for p in probes)
    figures = {"teacher_vocab": len(tv), "student_vocab": len(sv), "shared_ids": len(shared),
               "shared_ids_same_string": same_ids, "probes": len(probes), "probes_encoded_alike": same_probes}
    if same_ids == len(shared) and same_probes == len(probes):
        relation = "identical" if len(tv) == len(sv) else "padded"
    else:
        relation = "different"
    return {"relation": relation, **figures}


# ------------------------------------------------------------------------------------ token strings


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte -> the printable character that stands for it in token strings."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """`byte_alphabet` reversed: printable stand-in character -> byte."""
    return {c: b for b, c in byte_alphabet().items()}


def _scheme(spec: dict) -> str:
    dec = spec.get("decoder") or {}
    kinds = [d.get("type") for d in dec.get("decoders", [])] if dec.get("type") == "Sequence" else [dec.get("type")]
    if "ByteLevel" in kinds:
        return "byte_level"
    if "Metaspace" in kinds or "ByteFallback" in kinds or any(
            d.get("type") == "Replace" and d.get("pattern", {}).get("String") == "\u2581" for d in dec.get("decoders", [])):
        return "sentencepiece"
    raise CrossTokenizerError(
        f"cannot read this tokenizer's token strings as bytes (decoder {kinds}); cross-tokenizer distillation "
        "supports byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) and SentencePiece (Llama 2, Gemma, Mistral)"
    )


def token_bytes(tokenizer) -> tuple[list[bytes | None], list[bool]]:
    """For every id: the bytes of text the token stands for (None for special tokens), and whether it is a
    SentencePiece byte-fallback piece (<0xNN>, a duplicate spelling of a byte that may also be a normal piece).
    """
    hf = hf_tokenizer(tokenizer)
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise CrossTokenizerError(f"{type(hf).__name__} is not a fast (Rust) tokenizer: its tokens have no "
                                  "character offsets; load the model with a tokenizer.json")
    spec = json.loads(backend.to_str())
    scheme = _scheme(spec)
    vocab = backend.get_vocab(with_added_tokens=True)
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    out: list[bytes | None] = [None] * (max(vocab.values()) + 1)
    is_byte_piece = [False] * len(out)
    decoder = _byte_decoder()
    for piece, i in vocab.items():
        if i in added:  # matched on the raw text: its content is literal text (or a special marker)
            out[i] = None if added[i].get("special") else piece.encode("utf-8")
        elif scheme == "byte_level":
            try:
                out[i] = bytes(decoder[ch] for ch in piece)
            except KeyError:
                out[i] = None
        elif m := _BYTE_PIECE.fullmatch(piece):
            out[i] = bytes([int(m.group(1), 16)])
            is_byte_piece[i] = True
        else:
            out[i] = piece.replace("\u2581", " ").encode("utf-8")
    return out, is_byte_piece


# ----------------------------------------------------------------------------------- vocabulary map


@dataclass(frozen=True)
class VocabMap:
    """One-to-one pairs (teacher id, student id) of tokens that stand for the same bytes."""

    teacher_ids: np.ndarray
    student_ids: np.ndarray
    teacher_vocab: int
    student_vocab: int
    figures: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.teacher_ids)


def _by_bytes(table: list[bytes | None], byte_piece: list[bool]) -> dict[bytes, int]:
    """bytes -> the id that spells them; a normal piece wins over a byte-fallback piece, then the lower id."""
    out: dict[bytes, int] = {}
    for i in sorted(range(len(table)), key=lambda i: (byte_piece[i], i)):
        if table[i] is not None and table[i] != b"":
            out.setdefault(table[i], i)
    return out


def build_vocab_map(teacher_tokenizer, student_tokenizer, teacher_width: int | None = None,
                    student_width: int | None = None) -> VocabMap:
    """Pair tokens by exact byte string; the end-of-sequence tokens are paired by role."""
    t_table, t_bp = token_bytes(teacher_tokenizer)
    s_table, s_bp = token_bytes(student_tokenizer)
    t_by, s_by = _by_bytes(t_table, t_bp), _by_bytes(s_table, s_bp)
    pairs = sorted((t_by[b], s_by[b]) for b in t_by.keys() & s_by.keys())
    t_eos, s_eos = eos_id(teacher_tokenizer), eos_id(student_tokenizer)
    if t_eos is not None and s_eos is not None:
        pairs.append((t_eos, s_eos))
    t_ids = np.array([p[0] for p in pairs], np.int32)
    s_ids = np.array([p[1] for p in pairs], np.int32)
    tv, sv = teacher_width or len(t_table), student_width or len(s_table)
    figures = {"mapped_tokens": len(pairs), "teacher_vocab": len(t_table), "student_vocab": len(s_table),
               "teacher_vocab_mapped": round(len(pairs) / len(t_table), 4),
               "student_vocab_mapped": round(len(pairs) / len(s_table), 4)}
    if len(pairs) == 0:
        raise CrossTokenizerError("no token of the teacher spells the same text as a token of the student; "
                                  "these tokenizers cannot be mapped")
    return VocabMap(t_ids, s_ids, tv, sv, figures)


# ---------------------------------------------------------------------------------------------- loss


class CrossTargets(NamedTuple):
    """Teacher rows at aligned positions and where they go in the student's sequence."""

    logits: mx.array  # [B, P, Vt] teacher logits at aligned positions
    student_pos: mx.array  # [B, P] the student positions they pair with
    valid: mx.array  # [B, P] false on padding
    vmap: dict  # vmap_arrays(VocabMap)


def _tempered(logits: mx.array, unmapped: mx.array, temperature: float) -> tuple[mx.array, mx.array]:
    """logits / T, and the same with mapped ids masked out (a finite stand-in, not -inf: with nothing unmapped,
    logsumexp over all -inf has a NaN gradient)."""
    x = logits.astype(mx.float32) / temperature
    return x, mx.where(unmapped, x, -1e30)


def _buckets(x: mx.array, rest: mx.array, ids: mx.array) -> mx.array:
    return mx.concatenate([mx.take(x, ids, axis=-1), mx.logsumexp(rest, axis=-1, keepdims=True)], axis=-1)


def bucket_logits(logits: mx.array, ids: mx.array, unmapped: mx.array, temperature: float = 1.0) -> mx.array:
    """Logits [.., M + 1] over {each mapped id} + {the remainder}: softmax(result / T) is exactly softmax(logits / T)
    coarse-grained to those buckets (the remainder column is T * logsumexp(unmapped logits / T))."""
    x, rest = _tempered(logits, unmapped, temperature)
    return temperature * _buckets(x, rest, ids)


def _split_logprobs(logits: mx.array, ids: mx.array, unmapped: mx.array, temperature: float, k: int):
    """Bucket log-probabilities at T (see `bucket_logits`), and the k largest remainder log-probabilities
    (descending; -inf fillers when fewer exist). One masked copy of the row serves both: each pass over a
    262k-column vocabulary counts."""
    x, rest = _tempered(logits, unmapped, temperature)
    b = _buckets(x, rest, ids)
    lse = mx.logsumexp(b, axis=-1, keepdims=True)  # = logsumexp over the whole vocabulary
    if k <= 0:
        return b - lse, None
    k = min(k, x.shape[-1])
    idx = mx.stop_gradient(mx.argpartition(-rest, kth=k - 1, axis=-1)[..., :k])
    top = mx.take_along_axis(rest, idx, axis=-1)
    top = mx.take_along_axis(top, mx.stop_gradient(mx.argsort(-top, axis=-1)), axis=-1)
    return b - lse, mx.where(top > -1e29, top - lse, -mx.inf)


def cross_token_divergence(teacher_rows: mx.array, student_rows: mx.array, vmap: dict,
                           spec: LossSpec = DEFAULT_LOSS) -> dict[str, mx.array]:
    """Per-row T^2-scaled divergence between a teacher row [.., Vt] and a student row [.., Vs].

    `vmap` holds mx arrays "t_ids", "s_ids" (paired ids) and "t_unmapped", "s_unmapped" (bool per id).
    Returns {"kd": mapped + uld_weight * uld, "mapped": ..., "uld": ..., "coverage": teacher mass on
    paired tokens at T = 1}, with `spec`'s temperature, divergence and ULD settings. ULD compares the uld_top_k largest remainder probabilities of each side,
    sorted: the L1 distance of the sorted lists (Boizard et al.), without renormalising (the remainder's
    total mass is already matched by the mapped term's remainder bucket).
    """
    temperature, divergence, beta, uld_weight = spec.temperature, spec.divergence, spec.beta, spec.uld_weight
    k = spec.uld_top_k if uld_weight > 0 else 0
    bucket_t, top_t = _split_logprobs(mx.stop_gradient(teacher_rows), vmap["t_ids"], vmap["t_unmapped"], temperature, k)
    bucket_s, top_s = _split_logprobs(student_rows, vmap["s_ids"], vmap["s_unmapped"], temperature, k)
    mapped = mx.maximum(_divergence_from_logprobs(bucket_t, bucket_s, divergence, beta), 0.0)
    uld = mx.zeros(mapped.shape)
    if k:
        n = min(top_t.shape[-1], top_s.shape[-1])
        uld = mx.abs(mx.exp(top_t[..., :n]) - mx.exp(top_s[..., :n])).sum(axis=-1)
    t = teacher_rows.astype(mx.float32)
    coverage = mx.stop_gradient(mx.exp(mx.logsumexp(mx.take(t, vmap["t_ids"], axis=-1), axis=-1) - mx.logsumexp(t, axis=-1)))
    scale = temperature**2
    return {"kd": scale * (mapped + uld_weight * uld), "mapped": scale * mapped, "uld": scale * uld,
            "coverage": coverage}


def vmap_arrays(vmap: VocabMap) -> dict:
    t_unmapped = np.ones(vmap.teacher_vocab, bool)
    t_unmapped[vmap.teacher_ids] = False
    s_unmapped = np.ones(vmap.student_vocab, bool)
    s_unmapped[vmap.student_ids] = False
    return {"t_ids": mx.array(vmap.teacher_ids), "s_ids": mx.array(vmap.student_ids),
            "t_unmapped": mx.array(t_unmapped), "s_unmapped": mx.array(s_unmapped)}


def cross_objective(student_logits: mx.array, targets: CrossTargets, tokens: mx.array, loss_mask: mx.array,
                    spec: LossSpec = DEFAULT_LOSS) -> dict[str, mx.array]:
    """alpha * KD (at aligned positions) + (1 - alpha) * CE (the student's own next tokens, every response token).

    Returns {"loss", "kd", "ce", "ntokens", "mapped", "uld", "coverage", "aligned"}; "ntokens" counts the
    CE positions (the trainer's weighting), "aligned" the KD positions.
    """
    alpha = spec.alpha
    s_next, next_ids, mask = next_token_view(student_logits, tokens, loss_mask)
    ce = masked_mean(token_cross_entropy(s_next, next_ids), mask)
    rows = mx.take_along_axis(student_logits, targets.student_pos[..., None].astype(mx.int32), axis=1)
    valid = targets.valid
    # Padding rows (valid false) are neutralised to equal uniform rows: divergence 0, finite gradient.
    rows = mx.where(valid[..., None], rows, 0.0)
    t_rows = mx.where(valid[..., None], targets.logits, 0.0)
    d = cross_token_divergence(t_rows, rows, targets.vmap, spec)
    kd = masked_mean(d["kd"], valid)
    return {"loss": alpha * kd + (1.0 - alpha) * ce, "kd": kd, "ce": ce, "ntokens": mask.astype(mx.float32).sum(),
            "mapped": masked_mean(d["mapped"], valid), "uld": masked_mean(d["uld"], valid),
            "coverage": masked_mean(d["coverage"], valid), "aligned": valid.astype(mx.float32).sum()}


def cross_agreement(student_logits: mx.array, targets: CrossTargets) -> tuple[mx.array, mx.array]:
    """(aligned positions where the student's top token is the teacher's top token's pair, aligned positions).
    A teacher top token without a pair counts as disagreement."""
    vm = targets.vmap
    t_top = mx.argmax(targets.logits, axis=-1)
    lookup = mx.full((vm["t_unmapped"].shape[0],), -1, dtype=mx.int32)
    lookup[vm["t_ids"]] = vm["s_ids"].astype(mx.int32)
    want = lookup[t_top]
    rows = mx.take_along_axis(student_logits, targets.student_pos[..., None].astype(mx.int32), axis=1)
    agree = (mx.argmax(rows, axis=-1) == want) & targets.valid
    return agree.sum(), targets.valid.sum()


__all__ = [
    "CrossTargets", "CrossTokenizerError", "VocabMap", "build_vocab_map", "bucket_logits", "compare_tokenizers",
    "cross_agreement", "cross_objective", "cross_token_divergence", "token_bytes", "vmap_arrays",
]


# Lives here, not in vocab.py, so that vocab.py (same-tokenizer checks) never imports this module: one way.
def align_vocab_sizes(
    teacher_logits: mx.array,
    student_logits: mx.array,
    strategy: str = "slice",
    teacher_tokenizer=None,
    student_tokenizer=None,
    real_vocab_size: int | None = None,
    temperature: float = 1.0,
) -> tuple[mx.array, mx.array]:
    """Make teacher and student logits the same width, for tokenizers that agree on every shared id.

    strategy:
      "slice"  cut both to the real vocabulary (`real_vocab_size`, else the tokenizer's, else the
               smaller width): rows beyond it are embedding padding that no text ever produces.
      "pad"    widen the narrower one to the wider width with -inf, and set every id past the real
               vocabulary to -inf in both (padding rows never produce text: probability 0).
      "mapped" different tokenizers: both become logits over {tokens that spell the same text in both
               vocabularies} + {one remainder bucket}, so that softmax(result / temperature) is each
               side's softmax(logits / temperature) coarse-grained to those buckets (`cross_vocab`).
               The rows must already be aligned positions (`cross_examples.align_spans`).
    Equal widths are returned unchanged by "slice"/"pad". Otherwise both tokenizers are required and verified
    first with `check_same_tokenizer`; a mismatch raises `VocabMismatchError` instead of producing wrong targets.
    """
    vt, vs = teacher_logits.shape[-1], student_logits.shape[-1]
    if strategy not in ("slice", "pad", "mapped"):
        raise ValueError(f"unknown strategy {strategy!r}: use 'slice' or 'pad' (same tokenizer) or 'mapped' (different)")
    if strategy == "mapped":
        if teacher_tokenizer is None or student_tokenizer is None:
            raise VocabMismatchError("strategy 'mapped' needs teacher_tokenizer and student_tokenizer")
        vm = vmap_arrays(build_vocab_map(teacher_tokenizer, student_tokenizer, vt, vs))
        return (bucket_logits(teacher_logits, vm["t_ids"], vm["t_unmapped"], temperature),
                bucket_logits(student_logits, vm["s_ids"], vm["s_unmapped"], temperature))
    if vt == vs:
        return teacher_logits, student_logits
    if teacher_tokenizer is None or student_tokenizer is None:
        raise VocabMismatchError(
            f"teacher vocabulary width {vt} != student {vs}: pass teacher_tokenizer and student_tokenizer "
            "so that they can be verified before any slicing"
        )
    check_same_tokenizer(teacher_tokenizer, student_tokenizer)
    if strategy == "slice":
        v = real_vocab_size or min(tokenizer_vocab_size(teacher_tokenizer), vt, vs)
        if v > min(vt, vs):
            raise VocabMismatchError(f"real vocabulary {v} is larger than a logits width ({vt}, {vs})")
        return teacher_logits[..., :v], student_logits[..., :v]
    width = max(vt, vs)
    real = real_vocab_size or tokenizer_vocab_size(teacher_tokenizer)
    keep = mx.arange(width) < real

    def widen(x):
        if x.shape[-1] < width:
            pad = mx.full((*x.shape[:-1], width - x.shape[-1]), -mx.inf, dtype=x.dtype)
            x = mx.concatenate([x, pad], axis=-1)
        # Ids past the real vocabulary are padding rows in both models: probability 0 in both.
        return mx.where(keep, x, mx.array(-mx.inf, dtype=x.dtype))

    return widen(teacher_logits), widen(student_logits)
