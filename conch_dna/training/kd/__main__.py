import sys

from conch_dna.training.kd.cli import main

sys.exit(main())
