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
