"""Validation during training: the KD and CE losses and the teacher-student top-1 agreement on the held-back
examples, with the same targets and loss as training.
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx

from conch_dna.training.kd.config import KDConfig
from conch_dna.training.kd.cross_vocab import CrossTargets, cross_agreement, cross_objective
from conch_dna.training.kd.examples import Example, pad_batch
from conch_dna.training.kd.fused import TeacherStates
from conch_dna.training.kd.losses import LossSpec, SparseTargets, kd_objective, next_token_view
from conch_dna.training.kd.targets import TargetsFn


def student_logits(model, tokens, logits_width: int | None = None):
    """The student's logits, cut to the shared real vocabulary when its embedding matrix is padded wider."""
    logits = model(tokens)
    return logits[..., :logits_width] if logits_width is not None and logits_width < logits.shape[-1] else logits


def dense_targets(targets, logits_width: int | None = None):
    """Teacher targets as the reference loss takes them: `TeacherStates` become logits here."""
    if isinstance(targets, TeacherStates):
        logits = targets.head(targets.hidden).astype(mx.float32)
        return logits[..., :logits_width] if logits_width is not None else logits
    return targets


def top1_agreement(student_logits, targets, tokens, loss_mask) -> tuple[mx.array, mx.array]:
    """(number of scored positions where argmax student == argmax teacher, number of scored positions)."""
    s, _, mask = next_token_view(student_logits, tokens, loss_mask)
    if isinstance(targets, SparseTargets):
        best = mx.argmax(targets.logits, axis=-1, keepdims=True)
        t_top = mx.take_along_axis(targets.indices, best, axis=-1)[..., 0][:, :-1]
    else:
        t_top = mx.argmax(targets[:, :-1], axis=-1)
    agree = (mx.argmax(s, axis=-1) == t_top) & mask
    return agree.sum(), mask.sum()


def evaluate(model, examples: list[Example], targets_fn: TargetsFn, cfg: KDConfig, batch_size: int, logits_width: int | None = None) -> dict:
    """Token-weighted validation losses and teacher-student top-1 agreement over all of `examples`."""
    # Both parts are always measured (alpha 0.5), whatever alpha trains: an SFT run's KD is reported too.
    spec = replace(LossSpec.of(cfg), alpha=0.5, unlikelihood=0.0, no_repeat_teacher=False)
    sums = {"kd": 0.0, "ce": 0.0, "loss": 0.0}
    n_tok = n_agree = 0.0
    cross = {"aligned": 0.0, "agree": 0.0, "coverage": 0.0}
    for start in range(0, len(examples), batch_size):
        idx = list(range(start, min(start + batch_size, len(examples))))
        tokens, mask = pad_batch([examples[i] for i in idx])
        targets = dense_targets(targets_fn(idx, "val", tokens), logits_width)
        logits = student_logits(model, tokens, logits_width)
        if isinstance(targets, CrossTargets):
            # KD is a mean over aligned positions, CE over response tokens: each weighted by its own count.
            out = cross_objective(logits, targets, tokens, mask, spec)
            agree, n_al = cross_agreement(logits, targets)
            mx.eval(out, agree, n_al)
            n, n_al = out["ntokens"].item(), n_al.item()
            sums["ce"] += out["ce"].item() * n
            sums["kd"] += out["kd"].item() * n_al
            n_tok += n
            cross["aligned"] += n_al
            cross["agree"] += agree.item()
            cross["coverage"] += out["coverage"].item() * n_al
            continue
        out = kd_objective(logits, targets, tokens, mask, spec)
        out["loss"] = cfg.alpha * out["kd"] + (1.0 - cfg.alpha) * out["ce"]
        agree, n = top1_agreement(logits, targets, tokens, mask)
        mx.eval(out, agree, n)
        n = n.item()
        for k in sums:
            sums[k] += out[k].item() * n
        n_tok += n
        n_agree += agree.item()
    d = max(n_tok, 1.0)
    if cross["aligned"]:
        a = cross["aligned"]
        kd, ce = sums["kd"] / a, sums["ce"] / d
        return {"val_kd": kd, "val_ce": ce, "val_loss": cfg.alpha * kd + (1.0 - cfg.alpha) * ce,
                "val_agreement": cross["agree"] / a, "val_tokens": int(n_tok), "val_aligned": int(a),
                "val_coverage": cross["coverage"] / a}
    return {"val_kd": sums["kd"] / d, "val_ce": sums["ce"] / d, "val_loss": sums["loss"] / d,
            "val_agreement": n_agree / d, "val_tokens": int(n_tok)}
