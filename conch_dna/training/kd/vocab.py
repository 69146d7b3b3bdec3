"""Vocabulary checks and alignment for teacher/student pairs that share a tokenizer.

Models of one family often share a tokenizer but pad their embedding matrices to different sizes
(Qwen2.5: 151936 vs 152064 rows for 151665 real tokens). Slicing logits to a common size is right only
if both tokenizers agree on every id; for different tokenizers it is silently wrong (id 500 is another
string in each). So alignment verifies the tokenizers first and refuses otherwise.
"""

from __future__ import annotations

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
