"""Model preparation and loading: GGUF conversion, the offline default pair, and `load_model`."""

from __future__ import annotations

import os
from pathlib import Path

from conch_dna.models.gguf_convert import GGUFError, convert_gguf, verify_model_folder


class ModelNotFoundError(FileNotFoundError):
    """A teacher/student id that is neither a local model folder nor downloadable."""


def compute_dtype():
    """float32 on CPU (bf16 matmuls are slow there), bfloat16 on a GPU."""
    import mlx.core as mx

    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def cast_floating(model, dtype) -> None:
    """Cast the model's floating-point parameters (not quantized integer weights) to `dtype` in place."""
    import mlx.core as mx
    from mlx.utils import tree_map

    model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters()))


def load_model(path_or_id: str | os.PathLike, dtype=None):
    """Load an mlx-lm model and tokenizer from a local folder or a hub id; compute in `compute_dtype()`.

    "default-teacher" / "default-student" name the offline default pair (prepared on first use);
    "gemma-3-270m" the offline Gemma-3-270m (another tokenizer: for cross-tokenizer distillation).
    """
    from mlx_lm import load

    name = str(path_or_id)
    if name == "gemma-3-270m":
        from conch_dna.models.defaults import prepare_gemma3

        name = str(prepare_gemma3())
    if name in ("default-teacher", "default-student"):
        from conch_dna.models.defaults import prepare_default_models

        teacher, student = prepare_default_models()
        name = str(teacher if name == "default-teacher" else student)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not an mlx-lm model folder (no config.json); give a folder made by mlx_lm.convert or `python -m conch_dna.models`")
        name = str(path)
    elif name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFoundError(f"model path {name!r} does not exist; give an mlx-lm model folder or a hub id like 'mlx-community/Qwen2.5-0.5B-Instruct-4bit'")
    try:
        model, tokenizer = load(name)
    except Exception as e:
        if path.exists():
            raise
        raise ModelNotFoundError(f"could not load {name!r}: not a local folder, and downloading it failed ({type(e).__name__}: {e}). Offline? Pass a local model folder.") from e
    cast_floating(model, dtype or compute_dtype())
    model.eval()
    return model, tokenizer


__all__ = ["GGUFError", "ModelNotFoundError", "cast_floating", "compute_dtype", "convert_gguf", "load_model", "verify_model_folder"]
