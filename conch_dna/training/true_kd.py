"""The seed's module name: re-exports the KD API; `python -m conch_dna.training.true_kd` is the same CLI."""

import sys

from conch_dna.training.kd import DOMAIN_PROMPTS, KDConfig, KDResult, TrueKnowledgeDistiller
from conch_dna.training.kd.cli import main

__all__ = ["DOMAIN_PROMPTS", "KDConfig", "KDResult", "TrueKnowledgeDistiller", "main"]

if __name__ == "__main__":
    sys.exit(main(prog="python -m conch_dna.training.true_kd"))
