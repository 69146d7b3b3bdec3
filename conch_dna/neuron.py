"""What training and serving both need to run a neuron: its LoRA layer, its chat prompt, its end token and its
name. Training (`training.kd`) and serving (`cortex`) import this; it imports neither, so CORTEX answers
without loading the trainer, and it computes exactly what training did.
"""

from __future__ import annotations

import re
from functools import cache

import mlx.nn as nn


class DataError(ValueError):
    """Prompts, names or examples are unusable; the message says which file/prompt and what to do."""


# ----------------------------------------------------------------------------------------------- names

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_name(name: str, what: str = "domain") -> str:
    """A domain or neuron name, checked once before anything is written: it becomes a folder name under
    --output and the registry, so it may not hold a path separator or start with a dot (`../escaped`)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise DataError(f"invalid {what} name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a "
                        "letter or digit (it names a folder)")
    return name


# ------------------------------------------------------------------------------------------ LoRA layer


@cache
def lora_layer_classes() -> tuple[type, type]:
    """(mlx-lm's LoRALinear, the one neurons compute with). Built on first use: importing mlx_lm costs ~2 s."""
    from mlx_lm.tuner.lora import LoRALinear as MlxLoRALinear

    class LoRALinear(MlxLoRALinear):
        """mlx-lm's LoRA layer (same parameters, same adapter file) that multiplies in the input's dtype.

        mlx-lm keeps lora_a / lora_b in float32 (the optimizer's precision) and computes `x @ lora_a` with a
        bf16 x, so MLX promotes the whole [tokens, D] activation to a float32 copy, keeps it for the backward
        pass and runs both matmuls and their gradients in float32: on an H100 that made a Qwen2.5-0.5B
        student's forward pass 1.6x slower (17.9 -> 29.3 ms). Casting the two small weights instead, as
        PyTorch autocast does, keeps activations in the model's dtype; weights and gradients stay float32.
        """

        def __call__(self, x):
            y = self.linear(x)
            z = (self.dropout(x) @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
            return y + (self.scale * z).astype(x.dtype)

    return MlxLoRALinear, LoRALinear


def compute_in_input_dtype(model: nn.Module) -> None:
    """Switch mlx-lm's LoRA layers in `model` to `lora_layer_classes()[1]` (same fields and adapter file,
    multiplying in the input's dtype)."""
    mlx_lora, neuron_lora = lora_layer_classes()
    for module in model.modules():
        if type(module) is mlx_lora:  # same fields, only __call__ differs: switch the class in place
            module.__class__ = neuron_lora


def add_lora_layers(model: nn.Module, num_layers: int, lora_parameters: dict) -> None:
    """mlx-lm's `linear_to_lora_layers` (the adapter format mlx-lm loads), computing in the input's dtype."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    linear_to_lora_layers(model, num_layers, lora_parameters)
    compute_in_input_dtype(model)


# ---------------------------------------------------------------------------------------------- chat


def chat_prompt_ids(tokenizer, prompt: str, system_prompt: str | None = None) -> list[int]:
    """The token ids of `prompt` as a user turn through the tokenizer's chat template, ready for the answer."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": prompt}]
    return chat_ids(tokenizer, messages)


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The token ids of a conversation ({"role", "content"} turns) through the tokenizer's chat template, ready
    for the assistant's answer; without a template, the turns' text one after another."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    return list(tokenizer.encode("\n".join(m["content"] for m in messages)))


def hf_tokenizer(tokenizer):
    """The Hugging Face tokenizer: mlx-lm's TokenizerWrapper holds one in `_tokenizer` (a Hugging Face
    tokenizer's own `_tokenizer` is its Rust backend, which is not what we want)."""
    inner = vars(tokenizer).get("_tokenizer")
    return inner if hasattr(inner, "backend_tokenizer") else tokenizer


def eos_id(tokenizer) -> int | None:
    """The end-of-sequence id appended to answers that stopped by themselves (the lowest of the tokenizer's
    EOS ids), or None."""
    ids = getattr(tokenizer, "eos_token_ids", None)  # mlx-lm: a set; a Hugging Face tokenizer: maybe one int
    if isinstance(ids, int):
        return ids
    if ids:
        return sorted(ids)[0]
    return getattr(hf_tokenizer(tokenizer), "eos_token_id", None)
