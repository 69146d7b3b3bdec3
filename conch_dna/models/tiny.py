"""Tiny random-weight llama models with a real byte-level BPE tokenizer, built offline in about a second.

Used by the fast tests and the `tiny` benchmark preset: they go through exactly the code paths of real
models (mlx-lm folder, chat template, LoRA, adapters) without any download.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conch_dna.models.gguf_convert import tokenizer_files, write_model_folder

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = """The quick brown fox jumps over the lazy dog. Knowledge distillation trains a small student model
to match the probability distribution of a large teacher model. def add(a, b):\n    return a + b\n
Think step by step. First, list the facts. Then reason about them and check each step for errors.
A task is a goal with a plan; an action is one step; reflection asks what went well and what did not.
Debugging starts with a failing test: read the traceback, find the line, fix the cause, run it again.
Memory stores what happened, when, and why it mattered. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.
"""


def build_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok


@dataclass(frozen=True)
class TinyShape:
    """The shape of a tiny llama model."""

    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 384
    tie_word_embeddings: bool = True


def build_tiny_model(dest: str | Path, *, seed: int = 0, tokenizer_from: str | Path | None = None, **shape) -> Path:
    """Write a random-weight llama model folder at `dest` of the `TinyShape` given by `shape` (its fields as
    keywords); share `tokenizer_from`'s tokenizer if given."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    s = TinyShape(**shape)  # an unknown keyword is a TypeError naming it
    num_layers, hidden_size, num_heads, num_kv_heads = s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads
    intermediate_size, vocab_size, tie_word_embeddings = s.intermediate_size, s.vocab_size, s.tie_word_embeddings

    if tokenizer_from is not None:
        src = Path(tokenizer_from)
        tokenizer_json = (src / "tokenizer.json").read_text()
        n_vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    else:
        tokenizer_json = build_tokenizer(vocab_size).to_str()
        n_vocab = vocab_size
    config = {
        "model_type": "llama",
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "intermediate_size": intermediate_size,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": n_vocab,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": tie_word_embeddings,
        "eos_token_id": 2,
        "bos_token_id": 1,
        "torch_dtype": "float32",
    }
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    # Larger embeddings than the default init so that random models give peaked, varied distributions.
    model.model.embed_tokens.weight = mx.random.normal(model.model.embed_tokens.weight.shape) * 0.5
    weights = {k: np.array(v, dtype=np.float32) for k, v in tree_flatten(model.parameters())}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "chat_template": CHATML,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
    }
    return write_model_folder(Path(dest), config, weights, tokenizer_files(tokenizer_json, tokenizer_config),
                              info={"tiny": True, "seed": seed})


def build_random_adapter(model_folder: str | Path, dest: str | Path, *, seed: int, num_layers: int = 2, std: float = 0.3,
                         **lora_parameters) -> Path:
    """Write an mlx-lm LoRA adapter folder for the model at `model_folder` with random A and B (normal, `std`):
    a neuron that answers unlike its base, for tests and serving benchmarks (no training needed).
    `lora_parameters`: mlx-lm's (rank, scale, keys; default rank 8, scale 10, its default keys)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from conch_dna.models import load_model

    params = {"rank": 8, "scale": 10.0, "dropout": 0.0, **{k: v for k, v in lora_parameters.items() if v is not None}}
    model, _ = load_model(str(model_folder))
    model.freeze()
    linear_to_lora_layers(model, num_layers, params)
    mx.random.seed(seed)
    weights = {k: mx.random.normal(v.shape) * std for k, v in tree_flatten(model.trainable_parameters())}
    dest = Path(dest)
    dest.mkdir(parents=True)
    mx.save_safetensors(str(dest / "adapters.safetensors"), weights)
    config = {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params}
    (dest / "adapter_config.json").write_text(json.dumps(config))
    return dest
