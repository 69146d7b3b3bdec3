"""Conch DNA: a large EGO model thinks; small CORTEX neurons (a student + one LoRA adapter per domain)
do specialised work. `conch_dna.training.kd` distils EGO into CORTEX neurons.

Importing this package loads an optimized BLAS on Linux before MLX is imported (see `_blas`).
The library never configures logging; entry points do.
"""

from conch_dna._blas import blas_status, preload_blas

preload_blas()

__version__ = "0.1.0"
__all__ = ["blas_status", "preload_blas", "__version__"]
