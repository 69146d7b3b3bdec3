"""Vocabulary checks and alignment for teacher/student pairs that share a tokenizer.

Models of one family often share a tokenizer but pad their embedding matrices to different sizes
(Qwen2.5: 151936 vs 152064 rows for 151665 real tokens). Slicing logits to a common size is right only
if both tokenizers agree on every id; for different tokenizers it is silently wrong (id 500 is another
string in each). So alignment verifies the tokenizers first and refuses otherwise.
"""

from __future__ import annotations

import mlx.core as mx

# Texts that exercise whitespace runs, digits, code, unicode, emoji and chat markup.
PROBE_TEXTS = (
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n\n\tif x >= 10: print(f'{x:>8}')",
    "Numbers: 3.14159, 1,000,000 and 2026-11-24T16:49:00Z.",
    "Ünïcödé — naïve café, 日本語のテキスト, Привет мир, 🙂🚀 and \u00a0non-breaking spaces.",
    "   leading and trailing whitespace   \n\n\n  ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
)


class VocabMismatchError(ValueError):
    """Teacher and student tokenizers disagree: their logits cannot be compared id by id."""


def _vocab_of(tokenizer) -> dict[str, int]:
    tok = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's TokenizerWrapper wraps a HF tokenizer
    return tok.get_vocab()


def tokenizer_vocab_size(tokenizer) -> int:
    """Number of real token ids (highest id + 1), independent of the embedding matrix's padding."""
    return max(_vocab_of(tokenizer).values()) + 1


def check_same_tokenizer(teacher_tokenizer, student_tokenizer, probes=PROBE_TEXTS) -> dict:
    """Verify two tokenizers map text and ids identically; raise `VocabMismatchError` naming the difference.

    Returns figures for the log: vocabulary sizes and the number of probe tokens compared.
    """
    tv, sv = _vocab_of(teacher_tokenizer), _vocab_of(student_tokenizer)
    t_inv = {i: t for t, i in tv.items()}
    s_inv = {i: t for t, i in sv.items()}
    shared = sorted(set(t_inv) & set(s_inv))
    differing = [i for i in shared if t_inv[i] != s_inv[i]]
    if differing:
        i = differing[0]
        raise VocabMismatchError(
            f"teacher and student tokenizers disagree on {len(differing)} of {len(shared)} shared ids "
            f"(e.g. id {i}: teacher {t_inv[i]!r}, student {s_inv[i]!r}). Their logits cannot be sliced or "
            "padded into each other; use a student with the teacher's tokenizer (cross-tokenizer "
            "distillation needs the 'mapped' strategy)."
        )
    n = 0
    for text in probes:
        a, b = teacher_tokenizer.encode(text), student_tokenizer.encode(text)
        if list(a) != list(b):
            raise VocabMismatchError(f"teacher and student tokenizers encode {text!r} differently ({list(a)[:12]}... vs {list(b)[:12]}...)")
        n += len(a)
    return {"teacher_vocab": len(tv), "student_vocab": len(sv), "probe_tokens": n}


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
               The rows must already be aligned positions (`cross_vocab.align_spans`).
    Equal widths are returned unchanged by "slice"/"pad". Otherwise both tokenizers are required and verified
    first with `check_same_tokenizer`; a mismatch raises `VocabMismatchError` instead of producing wrong targets.
    """
    vt, vs = teacher_logits.shape[-1], student_logits.shape[-1]
    if strategy not in ("slice", "pad", "mapped"):
        raise ValueError(f"unknown strategy {strategy!r}: use 'slice' or 'pad' (same tokenizer) or 'mapped' (different)")
    if strategy == "mapped":
        if teacher_tokenizer is None or student_tokenizer is None:
            raise VocabMismatchError("strategy 'mapped' needs teacher_tokenizer and student_tokenizer")
        from conch_dna.training.kd.cross_vocab import bucket_logits, build_vocab_map, vmap_arrays

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
