"""GGUF files and the models cache: a file that lacks what it needs, or contradicts itself, is refused at
conversion with what is wrong; a full cache disk is a clear error (exit 2), never a traceback."""

import subprocess
import sys

import numpy as np
import pytest

from conch_dna.models.gguf_convert import GGUFError, convert_gguf

TOKENS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["ab", "<s>", "</s>"]


def tiny_gguf(path, *, merges=True, ffn_up_rows=16):
    """A one-block llama GGUF with a byte-level BPE tokenizer; `ffn_up_rows` other than 16 contradicts its config."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_context_length(64)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    if merges:
        w.add_token_merges(["a b"])
    w.add_bos_token_id(TOKENS.index("<s>"))
    w.add_eos_token_id(TOKENS.index("</s>"))
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(TOKENS), 8), "output_norm.weight": (8,), "blk.0.attn_norm.weight": (8,),
              "blk.0.ffn_norm.weight": (8,), "blk.0.attn_q.weight": (8, 8), "blk.0.attn_k.weight": (4, 8),
              "blk.0.attn_v.weight": (4, 8), "blk.0.attn_output.weight": (8, 8), "blk.0.ffn_gate.weight": (16, 8),
              "blk.0.ffn_up.weight": (ffn_up_rows, 8), "blk.0.ffn_down.weight": (8, 16)}
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_consistent_tiny_gguf_converts(tmp_path):
    from conch_dna.models import load_model

    out = convert_gguf(tiny_gguf(tmp_path / "ok.gguf"), tmp_path / "ok")
    model, tokenizer = load_model(out)
    assert tokenizer.encode("ab", add_special_tokens=False) == [TOKENS.index("ab")]


def test_a_gguf_without_merges_is_refused_naming_the_key(tmp_path):
    with pytest.raises(GGUFError, match="lacks tokenizer.ggml.merges"):
        convert_gguf(tiny_gguf(tmp_path / "m.gguf", merges=False), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_gguf_whose_tensors_contradict_its_config_is_refused_at_conversion(tmp_path):
    run = subprocess.run([sys.executable, "-m", "conch_dna.models", "--gguf", str(tiny_gguf(tmp_path / "bad.gguf", ffn_up_rows=12)),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert "do not fit its own config" in run.stderr and "up_proj.weight: (12, 8), the config needs (16, 8)" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "out").exists()


def test_a_full_models_cache_is_a_clear_error(tmp_path):
    small = tmp_path / "cache"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        run = subprocess.run([sys.executable, "-m", "conch_dna.models", "--cache-dir", str(small)], capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 2 and "could not write" in run.stderr and "No space left" in run.stderr, run.stderr[-2000:]
        assert "Traceback" not in run.stderr
        assert [p.name for p in small.iterdir()] == []  # no half-written model folder
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)
