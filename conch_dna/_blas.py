"""Load an optimized BLAS before MLX on Linux.

The Linux `mlx-cpu` wheel bundles netlib's *reference* BLAS (about 4 GFLOP/s on a 1024^3 float32
matmul). MLX resolves `cblas_sgemm` through the dynamic linker, so a library that exports it and is
loaded with RTLD_GLOBAL *before* `mlx` is imported takes precedence: OpenBLAS gives ~25-40x.

Control with the environment variable ``CONCH_BLAS``:
  unset / "auto"  search the usual OpenBLAS locations (Debian's libopenblas0-pthread etc.)
  "off" / "0"     do nothing (keep MLX's bundled BLAS)
  a path          load exactly this library (an error if it cannot be loaded or lacks cblas_sgemm)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import warnings

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

# What happened, for `blas_status()` and the benchmark: path of the loaded library or None.
_loaded: str | None = None
_reason: str = "not attempted"


def _try_load(path: str) -> str | None:
    """Load `path` globally; return an error string, or None on success."""
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        return f"cannot load {path}: {e}"
    if not hasattr(lib, "cblas_sgemm"):
        return f"{path} does not export cblas_sgemm"
    return None


def preload_blas() -> str | None:
    """Find and globally load an optimized BLAS. Returns its path, or None. Idempotent."""
    global _loaded, _reason
    if _loaded is not None or _reason != "not attempted":
        return _loaded
    if not sys.platform.startswith("linux"):
        _reason = "not Linux (MLX uses Accelerate/Metal)"
        return None
    choice = os.environ.get("CONCH_BLAS", "auto").strip()
    if choice.lower() in ("off", "0", "false", "no", "none"):
        _reason = "disabled by CONCH_BLAS"
        return None
    if "mlx.core" in sys.modules:
        _reason = "mlx was imported before conch_dna; import conch_dna first (or LD_PRELOAD the BLAS)"
        return None
    if choice.lower() not in ("auto", ""):
        err = _try_load(choice)
        if err:
            raise RuntimeError(f"CONCH_BLAS={choice!r}: {err}. Point it at a BLAS exporting cblas_sgemm, or set CONCH_BLAS=off.")
        _loaded, _reason = choice, "CONCH_BLAS"
        return _loaded
    candidates = list(_CANDIDATES)
    found = ctypes.util.find_library("openblas")
    if found:
        candidates.append(found)
    for path in candidates:
        if (os.path.isabs(path) and not os.path.exists(path)) or _try_load(path):
            continue
        _loaded, _reason = path, "auto"
        return path
    _reason = "no optimized BLAS found"
    warnings.warn(
        "conch_dna: only MLX's reference BLAS is available on this Linux machine (~4 GFLOP/s); "
        "install an optimized one, e.g. `apt-get install libopenblas0-pthread`, for ~25x faster CPU "
        "training (or set CONCH_BLAS=/path/to/libopenblas.so, or CONCH_BLAS=off to silence this).",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def blas_status() -> dict:
    return {"loaded": _loaded, "reason": _reason}
