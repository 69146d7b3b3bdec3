"""Evaluation of students against their teacher, reusable by benchmarks, the CORTEX quality gate and users.

All figures are token-weighted over the scored tokens (response tokens of examples; every predicted token
of a text), computed from exact dense logits in float32:

* `compare_to_teacher`: per-token KL(teacher || student) at T = 1, teacher-student top-1 agreement, and the
  student's perplexity on the (teacher's) responses.
* `text_perplexity`: perplexity on real human text (a file or a string), in non-overlapping windows.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import mlx.core as mx

from conch_dna.training.kd.data import Example, pad_batch
from conch_dna.training.kd.losses import next_token_view, token_cross_entropy, token_divergence


def compare_to_teacher(student, teacher, examples: list[Example], batch_size: int = 4, vocab: int | None = None) -> dict:
    """{"kl": mean KL(teacher||student), "agreement": top-1 agreement, "response_ppl": student perplexity,
    "tokens": scored tokens} over the response tokens of `examples`."""
    kl = ce = agree = n = 0.0
    for start in range(0, len(examples), batch_size):
        tokens, mask = pad_batch(examples[start : start + batch_size])
        s_logits, t_logits = student(tokens), teacher(tokens)
        if vocab is not None:
            s_logits, t_logits = s_logits[..., :vocab], t_logits[..., :vocab]
        s, targets, m = next_token_view(s_logits, tokens, mask)
        t = t_logits[:, :-1]
        mf = m.astype(mx.float32)
        parts = [
            (token_divergence(t, s, 1.0) * mf).sum(),
            (token_cross_entropy(s, targets) * mf).sum(),
            ((mx.argmax(s, axis=-1) == mx.argmax(t, axis=-1)) & m).sum(),
            mf.sum(),
        ]
        mx.eval(parts)
        kl, ce, agree, n = kl + parts[0].item(), ce + parts[1].item(), agree + parts[2].item(), n + parts[3].item()
    d = max(n, 1.0)
    return {"kl": kl / d, "agreement": agree / d, "response_ppl": math.exp(ce / d), "tokens": int(n)}


def text_perplexity(model, tokenizer, text: str | os.PathLike, max_tokens: int = 2048, window: int = 512) -> dict:
    """Perplexity of `model` on real text (a path or a string), over up to `max_tokens` tokens."""
    if isinstance(text, Path) or (isinstance(text, str) and len(text) < 4096 and Path(text).is_file()):
        text = Path(text).read_text(encoding="utf-8")
    ids = tokenizer.encode(text)[: max_tokens + 1]
    if len(ids) < 2:
        raise ValueError("the text is too short to measure perplexity (needs at least 2 tokens)")
    total, n = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = mx.array(ids[start : start + window + 1])[None]
        if chunk.shape[1] < 2:
            break
        ce = token_cross_entropy(model(chunk[:, :-1]), chunk[:, 1:]).sum()
        total += ce.item()
        n += chunk.shape[1] - 1
    return {"ppl": math.exp(total / n), "tokens": n}
