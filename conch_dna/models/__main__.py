import sys

from conch_dna.models.defaults import main

sys.exit(main())
