"""An adapter fused into its base: the fused folder computes what base + adapter computed, and bad input is
refused before anything is written."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.tuner.utils import load_adapters

from conch_dna.models import load_model
from conch_dna.models.fuse import FuseError, fuse_adapter
from conch_dna.models.gguf_convert import MANIFEST, verify_model_folder
from tests.conftest import random_adapter

TOKENS = mx.array([[1, 17, 42, 99, 7, 3, 250, 11]])


def test_the_fused_folder_computes_what_base_and_adapter_computed(tiny_pair, tmp_path):
    _, student = tiny_pair
    adapter = random_adapter(student, tmp_path / "adapter", seed=3, scale=2.0)
    with_adapter, _ = load_model(str(student))
    load_adapters(with_adapter, str(adapter))
    base, _ = load_model(str(student))
    out = fuse_adapter(student, adapter, tmp_path / "fused")
    fused, _ = load_model(str(out))
    want = np.array(with_adapter(TOKENS))
    assert np.abs(np.array(fused(TOKENS)) - want).max() < 1e-4
    assert np.abs(np.array(base(TOKENS)) - want).max() > 0.1  # the adapter changed what the model computes
    verify_model_folder(out)  # every file hashed in its manifest
    info = json.loads((out / MANIFEST).read_text())
    assert info["fused_from"] == str(student) and info["adapter"] == str(adapter)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2


def test_an_adapter_of_another_model_is_refused_and_nothing_is_written(tiny_pair, tmp_path):
    teacher, student = tiny_pair
    adapter = random_adapter(teacher, tmp_path / "teachers", seed=0)
    with pytest.raises(FuseError, match="does not fit base model"):
        fuse_adapter(student, adapter, tmp_path / "fused")
    assert not (tmp_path / "fused").exists() and not list(tmp_path.glob(".fused*"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FuseError, match="adapter_config.json is missing"):
        fuse_adapter(student, tmp_path / "empty", tmp_path / "fused")
    with pytest.raises(FuseError, match="not a local model folder"):
        fuse_adapter(tmp_path / "nowhere", adapter, tmp_path / "fused")


def test_fusing_never_replaces_a_folder_it_did_not_write(tiny_pair, tmp_path):
    _, student = tiny_pair
    adapter = random_adapter(student, tmp_path / "adapter", seed=1)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    cmd = [sys.executable, "-m", "conch_dna.models", "--fuse", str(adapter), "--base", str(student), "--out", str(mine)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 2 and "error:" in run.stderr
    assert (mine / "notes.txt").read_text() == "keep me"
    good = subprocess.run(cmd[:-1] + [str(tmp_path / "fused")], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "fused" / "model.safetensors").is_file()
    missing = subprocess.run(cmd[:5], capture_output=True, text=True)
    assert missing.returncode == 2 and "--fuse needs --base MODEL and --out" in missing.stderr


def test_a_fused_student_is_quantized_from_the_command_line(tiny_pair, tmp_path):
    """prune, heal, fuse, quantize: `--quantize BITS --base FOLDER --out DIR` writes a quantized copy that
    loads and stays close to its float base; a bad width, a missing base or a foreign --out exits 2."""
    _, student = tiny_pair
    fused = fuse_adapter(student, random_adapter(student, tmp_path / "adapter", seed=2), tmp_path / "fused")
    cmd = [sys.executable, "-m", "conch_dna.models", "--quantize", "4", "--base", str(fused), "--out"]
    run = subprocess.run(cmd + [str(tmp_path / "q4")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    stored = mx.load(str(tmp_path / "q4" / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    restored = mx.dequantize(stored[f"{name}.weight"], stored[f"{name}.scales"], stored[f"{name}.biases"], group_size=32, bits=4)
    fused_weight = load_model(str(fused))[0].model.layers[0].self_attn.q_proj.weight
    # every weight within one quantization step of the fused one (MLX's affine rounding keeps an edge of the
    # group exact, which can cost up to a step elsewhere), and not of the unfused base
    step = mx.abs(mx.repeat(stored[f"{name}.scales"].astype(mx.float32), 32, axis=-1))
    assert bool(mx.all(mx.abs(restored - fused_weight) <= step).item())
    base_weight = load_model(str(student))[0].model.layers[0].self_attn.q_proj.weight
    assert not bool(mx.all(mx.abs(restored - base_weight) <= step).item())
    assert load_model(str(tmp_path / "q4"))[0](TOKENS).shape == (1, TOKENS.shape[1], 384)
    assert json.loads((tmp_path / "q4" / "config.json").read_text())["quantization"]["bits"] == 4
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for bad, message in ((["--quantize", "7", "--base", str(fused), "--out", str(tmp_path / "q7")], "bits in"),
                         (["--quantize", "4", "--base", str(tmp_path / "nowhere"), "--out", str(tmp_path / "q")], "not a model folder"),
                         (["--quantize", "4", "--base", str(fused), "--out", str(mine)], "error:"),
                         (["--quantize", "4", "--base", str(fused)], "--quantize needs --base MODEL and --out"),
                         (["--quantize", "3", "--base", str(tmp_path / "q4"), "--out", str(tmp_path / "q3")], "already quantized")):
        refused = subprocess.run([sys.executable, "-m", "conch_dna.models", *bad], capture_output=True, text=True)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    assert (mine / "notes.txt").read_text() == "keep me" and not (tmp_path / "q7").exists() and not (tmp_path / "q3").exists()
