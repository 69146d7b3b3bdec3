"""GGUF conversion and the offline default pair: tokenizer equality, perplexity, chat, bad input."""

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import regex

from conch_dna.models import load_model
from conch_dna.models.defaults import (
    DEFAULT_STUDENT,
    STUDENT_LAYERS,
    STUDENT_NAME,
    prepare_default_models,
    prepare_student,
    smollm2_gguf_path,
    weight_bytes,
)
from conch_dna.models.gguf_convert import GGUFError, convert_gguf, read_metadata, verify_model_folder
from conch_dna.training.kd.cross_vocab import byte_alphabet

TRICKY_TEXTS = [
    "Hello, world!",
    "  two leading spaces, trailing tab\t, and\n\nblank lines\n   \n",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)  # O(2^n)\n",
    "Ünïcödé: naïve café résumé — “quotes” … 日本語 中文 한국어 Привет مرحبا 🙂🚀👍🏽",
    "digits 1234567890 and 3.14159e-10, 1,000,000; IDs like a1b2c3",
    "mixed   whitespace\u00a0nbsp\u2003em-space and\r\nCRLF",
    "<|im_start|>user\nWhat's 2+2? It's 4, isn't it?<|im_end|>\n",
    "JSON: {\"key\": [1, 2, {\"nested\": null}], 'single': true}",
]
HELD_OUT = Path("/usr/share/doc/python3.11/html/_sources/tutorial/controlflow.rst.txt")


# ------------------------------------------------------------- independent reference tokenizer (GGUF)


# llama.cpp's SmolLM pre-tokenizer: each digit alone, then GPT-2's split.
_GPT2 = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def reference_encode(text: str, meta: dict) -> list[int]:
    """Plain-Python byte-level BPE straight from the GGUF's vocabulary and merge list."""
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(meta["tokenizer.ggml.merges"])}
    specials = [t for t, ty in zip(tokens, meta["tokenizer.ggml.token_type"]) if ty == 3]
    b2u = byte_alphabet()
    ids = []
    for part in regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text):
        if not part:
            continue
        if part in vocab and part in specials:
            ids.append(vocab[part])
            continue
        pieces = []
        for chunk in regex.split(r"(\p{N})", part):
            if chunk:
                pieces += [chunk] if regex.fullmatch(r"\p{N}", chunk) else _GPT2.findall(chunk)
        for piece in pieces:
            word = [b2u[b] for b in piece.encode("utf-8")]
            while len(word) > 1:
                pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
                best, i = min(pairs)
                if best == 1 << 30:
                    break
                word = word[:i] + [word[i] + word[i + 1]] + word[i + 2 :]
            ids += [vocab[w] for w in word]
    return ids


def reference_decode(ids: list[int], meta: dict) -> str:
    u2b = {u: b for b, u in byte_alphabet().items()}
    tokens = meta["tokenizer.ggml.tokens"]
    out = bytearray()
    for i in ids:
        tok = tokens[i]
        if meta["tokenizer.ggml.token_type"][i] == 3:
            out += tok.encode()
        else:
            out += bytes(u2b[c] for c in tok)
    return out.decode("utf-8")


@pytest.fixture(scope="module")
def gguf_meta():
    return read_metadata(smollm2_gguf_path())


@pytest.fixture(scope="module")
def teacher(default_pair):
    return load_model(default_pair[0])


@pytest.mark.real_model
def test_tokenizer_ids_equal_gguf_vocabulary(teacher, gguf_meta):
    _, tok = teacher
    for text in TRICKY_TEXTS:
        ids = tok.encode(text)
        assert ids == reference_encode(text, gguf_meta), text
        assert reference_decode(ids, gguf_meta) == text
        assert tok.decode(ids) == text


@pytest.mark.real_model
def test_teacher_perplexity_on_held_out_text_is_sane(teacher):
    model, tok = teacher
    text = HELD_OUT.read_text() if HELD_OUT.is_file() else Path(json.__file__).read_text()
    x = mx.array(tok.encode(text)[:513])[None]
    ppl = float(mx.exp(nn.losses.cross_entropy(model(x[:, :-1]), x[:, 1:]).mean()).item())
    # Measured: 13.45 on the Python tutorial (controlflow.rst.txt, 512 tokens, float32); ~9.7-13.4 expected.
    print(f"teacher perplexity on held-out text: {ppl:.2f}")
    assert 5 < ppl < 30


@pytest.mark.real_model
def test_short_chat_generation_is_coherent(teacher):
    from mlx_lm import generate

    model, tok = teacher
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    answer = generate(model, tok, prompt, max_tokens=24)
    assert "Paris" in answer, answer


@pytest.mark.real_model
def test_default_student_is_the_4bit_teacher_and_pruned_is_by_name(default_pair):
    t_dir, s_dir = default_pair
    t_cfg = json.loads((t_dir / "config.json").read_text())
    s_cfg = json.loads((s_dir / "config.json").read_text())
    assert s_dir.name == DEFAULT_STUDENT and s_cfg["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert s_cfg["num_hidden_layers"] == t_cfg["num_hidden_layers"] == 30
    assert weight_bytes(s_dir) < 0.32 * weight_bytes(t_dir) / 2  # < 32% of the teacher in bf16 (float32 on disk)
    assert (t_dir / "tokenizer.json").read_bytes() == (s_dir / "tokenizer.json").read_bytes()
    p_dir = prepare_student(STUDENT_NAME, os.environ.get("CONCH_CACHE_DIR"))
    assert json.loads((p_dir / "config.json").read_text())["num_hidden_layers"] == len(STUDENT_LAYERS) == 16
    student, _ = load_model(p_dir)
    teacher, _ = load_model(t_dir)
    # Kept layers are the teacher's, renumbered.
    for new, old in enumerate(STUDENT_LAYERS):
        assert np.array_equal(np.array(student.model.layers[new].mlp.down_proj.weight), np.array(teacher.model.layers[old].mlp.down_proj.weight))
    # The 4-bit copy, dequantized on the CPU, computes what its quantized layers compute.
    import mlx.core as mx
    from mlx_lm import load as mlx_load

    from conch_dna.models import cast_floating

    quantized, _ = mlx_load(str(s_dir))
    cast_floating(quantized, mx.float32)
    ours, _ = load_model(s_dir)
    x = mx.array([[1, 504, 2821, 28, 5248, 314, 4917]])
    assert float(mx.abs(quantized(x) - ours(x)).max()) < 1e-3


@pytest.mark.real_model
def test_prepare_is_idempotent_and_instant(default_pair):
    import time

    t0 = time.perf_counter()
    again = prepare_default_models(os.environ.get("CONCH_CACHE_DIR"))
    assert again == default_pair and time.perf_counter() - t0 < 1.0
    verify_model_folder(default_pair[1])


# ------------------------------------------------------------------------------------------ bad input


def test_missing_gguf(tmp_path):
    with pytest.raises(GGUFError, match="not found"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")


def test_corrupt_gguf_names_the_file_and_leaves_nothing(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(300))
    with pytest.raises(GGUFError, match="bad.gguf"):
        convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.gguf"]


def test_truncated_real_gguf(tmp_path):
    src = smollm2_gguf_path()
    cut = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        cut.write_bytes(f.read(5_000_000))
    with pytest.raises(GGUFError, match="cut.gguf"):
        convert_gguf(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="unsupported GGUF architecture 'mamba'"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; chmod cannot make a folder unwritable")
def test_unwritable_cache_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(GGUFError, match="not writable"):
        prepare_default_models(ro / "cache")


def test_cache_dir_that_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(GGUFError, match="not writable"):
        prepare_default_models(blocker / "cache")


def test_interrupted_conversion_leaves_no_half_folder(tmp_path, monkeypatch):
    import conch_dna.models.gguf_convert as gc

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gc, "_tokenizer_config", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(smollm2_gguf_path(), tmp_path / "teacher")
    assert list(tmp_path.iterdir()) == []


def test_corrupted_prepared_folder_is_detected(default_pair, tmp_path):
    copy = tmp_path / "student"
    shutil.copytree(default_pair[1], copy)
    with open(copy / "tokenizer_config.json", "a") as f:
        f.write(" ")
    with pytest.raises(GGUFError, match="corrupt"):
        verify_model_folder(copy)


def test_missing_model_path_is_clear(tmp_path):
    from conch_dna.models import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="missing config.json"):
        load_model(tmp_path / "empty")


def test_conch_dtype_overrides_the_compute_dtype(monkeypatch):
    import mlx.core as mx

    from conch_dna.models import compute_dtype

    monkeypatch.setenv("CONCH_DTYPE", "bfloat16")
    assert compute_dtype() == mx.bfloat16
    monkeypatch.setenv("CONCH_DTYPE", "int8")
    with pytest.raises(ValueError, match="CONCH_DTYPE='int8'"):
        compute_dtype()
    monkeypatch.delenv("CONCH_DTYPE")
    assert compute_dtype() == (mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16)


def test_flops_per_token_counts_every_matmul():
    from conch_dna.models import flops_per_token

    cfg = {"hidden_size": 8, "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1,
           "intermediate_size": 16, "vocab_size": 10}
    # per block: q and o 8x8, k and v 8x4, MLP 3 x 8x16; then the head 8x10; attention 2 x 2 heads x 4 dims per earlier token
    block = 64 + 64 + 32 + 32 + 3 * 128
    assert flops_per_token(cfg) == 2 * (3 * block + 80)
    assert flops_per_token(cfg, context=5) == 2 * (3 * (block + 2 * 2 * 4 * 5) + 80)
    assert flops_per_token({**cfg, "num_hidden_layers": 1}) < flops_per_token(cfg)


def test_default_students_flops_against_the_teacher(default_pair):
    """Depth pruning cuts the blocks' FLOPs, not the output head's: 16 of 30 layers cost 63% of the teacher, the
    14-layer cut 58%, and that cut keeps the layers it names."""
    from conch_dna.models import flops_per_token
    from conch_dna.models.defaults import PRUNED14_LAYERS

    teacher = json.loads((default_pair[0] / "config.json").read_text())
    pruned = {**teacher, "num_hidden_layers": len(STUDENT_LAYERS)}
    assert flops_per_token(teacher) == 268_959_744
    assert round(flops_per_token(pruned) / flops_per_token(teacher), 3) == 0.632
    folder = prepare_student("smollm2-135m-instruct-pruned14", os.environ.get("CONCH_CACHE_DIR"))
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 14 and cfg["conch_pruned_from_layers"] == list(PRUNED14_LAYERS)
    assert flops_per_token(cfg) / flops_per_token(teacher) < 0.6
