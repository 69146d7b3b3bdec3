"""The KD API under one module: the distiller, its config and the loss functions; `python -m
conch_dna.training.true_kd` is the same command as `conch-distill`."""

import sys

from conch_dna.training.kd import DOMAIN_PROMPTS, KDConfig, KDResult, TrueKnowledgeDistiller
from conch_dna.training.kd.cli import main
from conch_dna.training.kd.cross_vocab import align_vocab_sizes
from conch_dna.training.kd.losses import compute_ce_loss, compute_kd_loss

__all__ = ["DOMAIN_PROMPTS", "KDConfig", "KDResult", "TrueKnowledgeDistiller", "align_vocab_sizes", "compute_ce_loss",
           "compute_kd_loss", "main"]

if __name__ == "__main__":
    sys.exit(main(prog="python -m conch_dna.training.true_kd"))
