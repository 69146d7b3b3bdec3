"""Convert a GGUF file (llama.cpp / Ollama) into an mlx-lm model folder.

The folder holds config.json, model.safetensors (float32 by default: GGUF's 4/8-bit blocks dequantize
exactly into float32, not into bf16) and tokenizer.json + tokenizer_config.json with the chat template, so
stock `mlx_lm.load(folder)` reads it. Supported: llama-family (Llama, SmolLM, Mistral) and qwen2 with
byte-level BPE tokenizers, and gemma3 (text) with its SentencePiece-BPE tokenizer (byte fallback). Anything
else fails with a clear error before a file is written.

The folder is written to a temporary sibling and renamed into place, so a half-converted model is never
visible under the final name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from conch_dna.atomic import OWNER_FILE, atomic_folder, check_replaceable, sha256_file
from conch_dna.models.templates import check_chat_template

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")
MANIFEST = "conch_model.json"


def verify_model_folder(folder: str | os.PathLike) -> None:
    """Raise `GGUFError` naming the first file whose sha256 differs from the folder's manifest."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise GGUFError(f"{folder} has no {MANIFEST}: it was not fully prepared. Delete it and prepare it again.")
    for name, digest in json.loads(manifest.read_text())["files"].items():
        f = folder / name
        if not f.is_file() or sha256_file(f) != digest:
            raise GGUFError(f"{f} is missing or corrupt (sha256 mismatch). Delete {folder} and prepare it again.")


class GGUFError(ValueError):
    """The GGUF file is missing, unreadable, or of a kind we cannot convert."""


def _reader(path: Path):
    import gguf

    if not path.is_file():
        raise GGUFError(f"GGUF file not found: {path}. Give the path of a .gguf model file.")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct errors/np errors on garbage
        raise GGUFError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {e}). "
            "The file may be truncated or corrupt: download or copy it again."
        ) from e


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_metadata(path: str | os.PathLike) -> dict:
    """The GGUF key/value metadata as plain Python values (token lists included)."""
    reader = _reader(Path(path))
    return {k: f.contents() for k, f in reader.fields.items()}


# ---------------------------------------------------------------------------------------------- config


def _config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}. "
            "Convert this model with mlx_lm.convert from its Hugging Face weights instead."
        )
    names = {t.name for t in reader.tensors}
    n_vocab = len(_field(reader, "tokenizer.ggml.tokens"))
    cfg = {
        "model_type": arch,
        "architectures": [_HF_CLASS[arch]],
        "hidden_size": int(_field(reader, f"{arch}.embedding_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_attention_heads": int(_field(reader, f"{arch}.attention.head_count")),
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv")),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 4096)),
        "vocab_size": int(_field(reader, f"{arch}.vocab_size", n_vocab)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if arch == "llama":
        cfg["attention_bias"] = False
        cfg["mlp_bias"] = False
    if arch == "gemma3":
        # mlx-lm's text-only Gemma 3. Three values are not in the GGUF; these are Gemma 3's published ones
        # (every size uses them; the 270m/1b models have no rope scaling).
        cfg.update({
            "model_type": "gemma3_text",
            "head_dim": int(_field(reader, "gemma3.attention.key_length")),
            "sliding_window": int(_field(reader, "gemma3.attention.sliding_window")),
            "rope_local_base_freq": 10000.0,
            "query_pre_attn_scalar": 256,
            "sliding_window_pattern": 6,
            "hidden_activation": "gelu_pytorch_tanh",
        })
        tokens = _field(reader, "tokenizer.ggml.tokens")
        if "<end_of_turn>" in tokens:  # a chat turn ends with <end_of_turn>: generation must stop there too
            cfg["eos_token_id"] = [cfg["eos_token_id"], tokens.index("<end_of_turn>")]
    return cfg


_HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}


# --------------------------------------------------------------------------------------------- weights

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma 3 normalises around both halves of each block, and inside attention (q/k norms).
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _hf_name(gguf_name: str, arch: str = "llama") -> str:
    stem, kind = gguf_name.rsplit(".", 1)  # kind: weight | bias
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{kind}"
    layer_names = _GEMMA3_LAYER_NAMES if arch == "gemma3_text" else _LAYER_NAMES
    blk, idx, part = stem.split(".", 2)
    if blk != "blk" or part not in layer_names:
        raise GGUFError(f"unexpected GGUF tensor {gguf_name!r}; this file's layout is not supported")
    return f"model.layers.{idx}.{layer_names[part]}.{kind}"


def _reverse_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of Q/K rows (it interleaves the rotary halves for its RoPE kernel)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _weights(reader, cfg: dict, dtype=np.float32) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise GGUFError(f"tensor {t.name} uses quantization {t.tensor_type.name}, which cannot be dequantized: {e}") from e
        w = np.asarray(w, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
        if cfg["model_type"] == "llama":
            if t.name.endswith("attn_q.weight"):
                w = _reverse_permute(w, cfg["num_attention_heads"])
            elif t.name.endswith("attn_k.weight"):
                w = _reverse_permute(w, cfg["num_key_value_heads"])
        if cfg["model_type"] == "gemma3_text" and t.name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's RMSNorm scale as (1 + w); mlx-lm adds the 1 itself
        out[_hf_name(t.name, cfg["model_type"])] = w.astype(dtype)
    return out


def check_shapes(cfg: dict, weights: dict[str, np.ndarray], source: Path) -> None:
    """Refuse a GGUF whose tensors do not have the shapes its own config says (a tampered or mislabelled file)
    at conversion, listing them, instead of writing a folder that only fails when it is loaded."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config=cfg)
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model_class(args_class.from_dict(cfg)).parameters())}
    problems = [f"{k}: {tuple(w.shape)}, the config needs {expected[k]}" for k, w in weights.items()
                if k in expected and tuple(w.shape) != expected[k]]
    problems += [f"{k} is missing" for k in expected if k not in weights and not k.startswith("lm_head")]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise GGUFError(f"{source}: its tensors do not fit its own config ({shown}); the file is damaged or mislabelled")


# ------------------------------------------------------------------------------------------- tokenizer

# llama.cpp pre-tokenizer names -> the split regex that precedes byte-level BPE.
_GPT2_RE = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_QWEN2_RE = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
_LLAMA3_RE = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# name -> (list of split regexes applied in order, each isolating matches)
PRE_TOKENIZER_RULES = {
    "gpt2": [_GPT2_RE],
    "default": [_GPT2_RE],
    "smollm": [r"\p{N}", _GPT2_RE],  # digits one by one, then GPT-2's rule
    "qwen2": [_QWEN2_RE],
    "llama-bpe": [_LLAMA3_RE],
    "llama3": [_LLAMA3_RE],
}


REQUIRED_TOKENIZER_KEYS = {"gpt2": ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"), "llama": ("tokenizer.ggml.tokens",)}


def build_tokenizer(meta: dict):
    """A `tokenizers.Tokenizer` rebuilt from GGUF metadata: byte-level BPE ("gpt2") or SentencePiece BPE ("llama")."""
    kind = meta.get("tokenizer.ggml.model")
    if missing := [k for k in REQUIRED_TOKENIZER_KEYS.get(kind, ()) if k not in meta]:
        raise GGUFError(f"the GGUF's {kind!r} tokenizer lacks {', '.join(missing)}: the file is incomplete or was "
                        "written by another tool; convert this model from its Hugging Face files with mlx_lm.convert")
    if kind not in ("gpt2", "llama"):
        raise GGUFError(
        f"tokenizer type {kind!r} is not supported (supported: 'gpt2' byte-level BPE, 'llama' SentencePiece BPE); "
        "convert this model with mlx_lm.convert from its Hugging Face files instead"
    )
    tok = _byte_bpe_tokenizer(meta) if kind == "gpt2" else _sentencepiece_tokenizer(meta)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        from tokenizers import processors

        name = meta["tokenizer.ggml.tokens"][bos]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{name} $A", pair=f"{name} $A {name} $B", special_tokens=[(name, int(bos))])
    return tok


def _byte_bpe_tokenizer(meta: dict):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_RULES:
        raise GGUFError(f"unknown GGUF pre-tokenizer {pre!r}; known: {', '.join(sorted(PRE_TOKENIZER_RULES))}")
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    splits = [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in PRE_TOKENIZER_RULES[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    _add_atomic_tokens(tok, meta)
    return tok


def _sentencepiece_tokenizer(meta: dict):
    """SentencePiece BPE as llama.cpp runs it (and Hugging Face's Gemma tokenizer.json): spaces become "▁",
    then adjacent pieces merge, highest-scoring result first, over the whole text; a piece not in the
    vocabulary falls back to its UTF-8 bytes (<0xNN> tokens). User-defined tokens (newline and space runs,
    HTML tags) are matched first, on the raw text.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens, scores = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.scores")
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    if scores is None or len(scores) != len(tokens):
        raise GGUFError("SentencePiece GGUF tokenizer has no per-token scores; its merges cannot be rebuilt")
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges_from_scores(tokens, scores, types), byte_fallback=True,
                               fuse_unk=True, unk_token=tokens[unk] if unk is not None else None))
    steps = [normalizers.Replace(" ", "\u2581")]
    if meta.get("tokenizer.ggml.add_space_prefix", False):
        steps.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.get("tokenizer.ggml.add_space_prefix", False):
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    _add_atomic_tokens(tok, meta)
    return tok


def _merges_from_scores(tokens, scores, types) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's rule "merge the pair whose result scores highest".

    Every normal piece that splits into two pieces of the vocabulary yields a merge ranked by the piece's
    score (ties: the left part's score, then the right's, as Hugging Face's converter orders them).
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for piece, score, ty in zip(tokens, scores, types):
        if ty != 1 or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_atomic_tokens(tok, meta: dict) -> None:
    """Control (type 3) and user-defined (type 4) tokens are atomic: matched on the raw text, never split."""
    from tokenizers import AddedToken

    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    tok.add_tokens([AddedToken(t, special=(ty == 3), normalized=False) for t, ty in zip(tokens, types) if ty in (3, 4)])


def _tokenizer_config(meta: dict) -> dict:
    tokens = meta["tokenizer.ggml.tokens"]

    def name(key):
        i = meta.get(key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id") or name("tokenizer.ggml.eos_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
    }
    if meta.get("tokenizer.chat_template"):
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    elif "<start_of_turn>" in tokens:
        cfg["chat_template"] = GEMMA_CHAT_TEMPLATE  # base Gemma GGUFs carry no template; use Gemma's turn format
    return cfg


# Gemma's published turn format (text only): a system prompt is prefixed to the first user turn.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\n\n' %}"
    "{% else %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{{ ns.system if m['role'] == 'user' else '' }}{{ m['content'] | trim }}<end_of_turn>\n"
    "{% if m['role'] == 'user' %}{% set ns.system = '' %}{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


# ------------------------------------------------------------------------------------------ convert


def write_model_folder(dest: Path, config: dict, weights: dict, files: dict[str, str], info: dict | None = None,
                       keep_foreign: bool = False) -> Path:
    """Write an mlx-lm model folder atomically: build it in a temp sibling, then rename into place. `files`:
    the tokenizer's (tokenizer.json, tokenizer_config.json) and any other text files, by name. An existing
    `dest` that holds anything but a model folder this tool wrote is refused, or with `keep_foreign` kept under
    another name (`atomic_folder`)."""
    from safetensors.numpy import save_file

    with atomic_folder(dest, keep_foreign=keep_foreign) as tmp:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for fname, content in files.items():
            (tmp / fname).write_text(content)
        # The manifest lists every file's sha256; it is written last, so its presence (after the rename)
        # means the folder is complete, and `verify_model_folder` can detect later corruption.
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"files": files, **(info or {})}, indent=2))
    return dest


def write_derived_folder(dest: str | os.PathLike, weights: dict, config: dict, source: Path, info: dict) -> Path:
    """Write a model folder derived from the model folder `source` (quantized, fused) atomically, as
    `write_model_folder` does: `weights` (MLX arrays) and `config`, every other file of `source` but its weights
    and what this tool writes (the tokenizer's), and a manifest with `info`."""
    import mlx.core as mx

    own = {"config.json", "model.safetensors.index.json", MANIFEST, OWNER_FILE}
    with atomic_folder(dest) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, {"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for f in source.iterdir():
            if f.is_file() and f.name not in own and not f.name.endswith(".safetensors"):
                (tmp / f.name).write_bytes(f.read_bytes())
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"files": files, **info}, indent=2))
    return Path(dest)


def tokenizer_files(tokenizer_json: str, tokenizer_config: dict) -> dict[str, str]:
    """A model folder's tokenizer files, by name."""
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": json.dumps(tokenizer_config, indent=2)}


def convert_gguf(gguf_path: str | os.PathLike, dest: str | os.PathLike, dtype=np.float32, keep_foreign: bool = False) -> Path:
    """Convert `gguf_path` into an mlx-lm model folder at `dest` (a model folder this tool wrote there is replaced
    atomically; any other non-empty folder is refused, or with `keep_foreign` kept under another name)."""
    source, dest = Path(gguf_path), Path(dest)
    if source.resolve().is_relative_to(dest.resolve()):
        raise GGUFError(f"--out {dest} holds the GGUF being converted ({source}); choose a destination outside it")
    if not keep_foreign:  # before any work
        check_replaceable(dest, hint=f"pass --force to keep them under {dest.name}.kept-<time> and write the model there")
    reader = _reader(source)
    cfg = _config(reader)  # validates the architecture before any heavy work
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    check_chat_template(meta.get("tokenizer.chat_template"), str(source))  # it is copied into the folder
    tokenizer = build_tokenizer(meta)
    weights = _weights(reader, cfg, dtype)
    check_shapes(cfg, weights, source)
    return write_model_folder(
        dest, cfg, weights, tokenizer_files(tokenizer.to_str(), _tokenizer_config(meta)), keep_foreign=keep_foreign,
        info={"source": str(source), "source_sha256": sha256_file(source), "tool": "conch_dna.models.gguf_convert"},
    )
