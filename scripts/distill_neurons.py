#!/usr/bin/env python
"""Distil EGO into CORTEX neurons from the command line (same flags as `python -m conch_dna.training.kd`).

    python scripts/distill_neurons.py --domain thinking --iters 30
    python scripts/distill_neurons.py --all
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import conch_dna  # noqa: E402,F401  (optimized BLAS before mlx)
from conch_dna.training.kd.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="scripts/distill_neurons.py"))
