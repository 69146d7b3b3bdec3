"""True knowledge distillation from the EGO teacher into CORTEX neurons (LoRA students)."""

from conch_dna.training.kd.losses import (
    DIVERGENCES,
    SparseTargets,
    compute_ce_loss,
    compute_kd_loss,
    kd_objective,
    masked_mean,
    next_token_view,
    token_divergence,
    topk_targets,
)
from conch_dna.training.kd.vocab import VocabMismatchError, align_vocab_sizes, check_same_tokenizer

__all__ = [
    "DIVERGENCES",
    "SparseTargets",
    "VocabMismatchError",
    "align_vocab_sizes",
    "check_same_tokenizer",
    "compute_ce_loss",
    "compute_kd_loss",
    "kd_objective",
    "masked_mean",
    "next_token_view",
    "token_divergence",
    "topk_targets",
]
