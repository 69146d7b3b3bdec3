"""Model preparation and loading: GGUF conversion, the offline default pair, and `load_model`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conch_dna.models.gguf_convert import GGUFError, convert_gguf, verify_model_folder
from conch_dna.models.templates import ChatTemplateError, check_chat_template, check_folder_chat_templates


class ModelNotFoundError(FileNotFoundError):
    """A teacher/student id that is neither a local model folder nor downloadable."""


def compute_dtype():
    """float32 on CPU (bf16 matmuls are slow there), bfloat16 on a GPU; `CONCH_DTYPE` (float32, bfloat16,
    float16) overrides, e.g. to reproduce CPU figures on a GPU."""
    import mlx.core as mx

    if name := os.environ.get("CONCH_DTYPE"):
        if name not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"CONCH_DTYPE={name!r}: use float32, bfloat16 or float16")
        return getattr(mx, name)
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def cast_floating(model, dtype) -> None:
    """Cast the model's floating-point parameters (not quantized integer weights) to `dtype` in place."""
    import mlx.core as mx
    from mlx.utils import tree_map

    model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters()))


def bf16_bytes(model) -> int:
    """Weight bytes of a loaded model were its floating-point parameters bf16 (packed integers as they are):
    the teacher's size that a neuron's cost is compared with."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    return sum(2 * p.size if mx.issubdtype(p.dtype, mx.floating) else p.nbytes for _, p in tree_flatten(model.parameters()))


def flops_per_token(config: dict, context: int = 0) -> int:
    """Forward FLOPs (2 per multiply-add) of one token through a llama-style decoder described by its
    `config.json`: every block's projections and MLP, the output head, and attention over `context` earlier
    tokens. What a student costs to run, against its teacher, independent of the machine."""
    d, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // heads
    kv = config.get("num_key_value_heads") or heads
    block = d * heads * head_dim * 2 + d * kv * head_dim * 2 + 3 * d * config["intermediate_size"]
    attention = 2 * heads * head_dim * context
    return 2 * (layers * (block + attention) + d * config["vocab_size"])


def model_path(path_or_id: str | os.PathLike) -> Path | None:
    """The local folder a model id names (an offline default, prepared on first use, or an existing path);
    None for a hub id."""
    from conch_dna.models.defaults import NAMED_MODELS, prepare_named

    name = str(path_or_id)
    if name in NAMED_MODELS:
        return prepare_named(name)
    path = Path(name).expanduser()
    return path if path.exists() else None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def check_model_folder(path_or_id: str | os.PathLike) -> Path | None:
    """Refuse a local model folder that cannot work, before any expensive step: it needs config.json,
    safetensors weights and a tokenizer (mlx-lm would otherwise build a 5-token stand-in and train on
    `<unk>`). Returns the folder, or None for a hub id (checked when it is loaded)."""
    path = model_path(path_or_id)
    if path is None:
        return None
    missing = [f for f in ("config.json",) if not (path / f).is_file()]
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors (the weights)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES) + " (the tokenizer)")
    if missing:
        raise ModelNotFoundError(f"{path} is not a complete mlx-lm model folder: missing {', '.join(missing)}. "
                                 "Give a folder made by mlx_lm.convert or `python -m conch_dna.models`.")
    check_folder_chat_templates(path)
    return path


def context_length(path_or_id: str | os.PathLike) -> int | None:
    """The longest sequence a local model folder was built for (config.json's `max_position_embeddings`,
    or its text model's), or None when unknown (a hub id, no such field)."""
    path = model_path(path_or_id)
    if path is None or not (path / "config.json").is_file():
        return None
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = cfg.get("max_position_embeddings") or (cfg.get("text_config") or {}).get("max_position_embeddings")
    return int(value) if isinstance(value, int | float) and value > 0 else None


def load_model(path_or_id: str | os.PathLike, dtype=None):
    """Load an mlx-lm model and tokenizer from a local folder or a hub id; compute in `compute_dtype()`.

    Names of `defaults.NAMED_MODELS` ("default-teacher", "default-student", ...) are the offline models,
    prepared on first use; "gemma-3-270m" is another tokenizer, for cross-tokenizer distillation.
    """
    from mlx_lm import load

    name = str(path_or_id)
    path = check_model_folder(name)
    if path is not None:
        name = str(path)
    elif name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFoundError(f"model path {name!r} does not exist; give an mlx-lm model folder or a hub id like 'mlx-community/Qwen2.5-0.5B-Instruct-4bit'")
    try:
        model, tokenizer = load(name)
    except Exception as e:
        if path is not None:
            raise
        raise ModelNotFoundError(f"could not load {name!r}: not a local folder, and downloading it failed ({type(e).__name__}: {e}). Offline? Pass a local model folder.") from e
    if path is None:  # a hub model: its template is known once its tokenizer is loaded
        check_chat_template(getattr(tokenizer, "chat_template", None), name)
    cast_floating(model, dtype or compute_dtype())
    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        dequantize_on_cpu(model)
    model.eval()
    return model, tokenizer


def dequantize_on_cpu(model) -> bool:
    """Replace quantized layers by float ones holding their dequantized weights; True if any were.

    MLX's CPU backend runs quantized matmuls outside the BLAS: a 4 x 256-token forward of SmolLM2 at 4 bits
    took 128 s, against 4.8 s for the same weights dequantized to float32, whose logits differ by at most
    2e-4 (measured here, 2 cores). The function is the quantized model's (QLoRA's frozen quantized base),
    LoRA adapters trained on it load unchanged onto the quantized folder, and on a GPU or Metal, where
    quantized kernels are fast, nothing is dequantized."""
    import mlx.nn as nn
    from mlx_lm.utils import dequantize_model

    if not any(isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding) for m in model.modules()):
        return False
    dequantize_model(model)
    return True


__all__ = ["ChatTemplateError", "GGUFError", "ModelNotFoundError", "bf16_bytes", "cast_floating", "check_model_folder", "compute_dtype", "dequantize_on_cpu", "convert_gguf", "load_model", "verify_model_folder"]
