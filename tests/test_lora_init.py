"""The adapter's start from the teacher's residual (lora_init.py): exact at full rank, better than a no-op at
low rank, left alone where there is no difference, refused or skipped for students of another shape, and
used by the distiller. Tiny random-weight models built in the test."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conch_dna.models import load_model
from conch_dna.training.kd import KDConfig, TrueKnowledgeDistiller
from conch_dna.training.kd.config import LEARNING_RATE, ConfigError
from conch_dna.training.kd.evaluate import compare_to_teacher
from conch_dna.training.kd.examples import Example
from conch_dna.training.kd.lora_init import input_covariances, residual_factors, residual_start, top_singular
from conch_dna.training.kd.trainer import apply_lora
from tests.conftest import PROMPTS, cli_config


def token_examples(n=6, length=24, vocab=384, seed=0):
    mx.random.seed(seed)
    rows = mx.random.randint(3, vocab, (n, length)).tolist()
    return [Example(tuple(r), 4) for r in rows]


@pytest.fixture(scope="module")
def noisy_student(tiny_pair, tmp_path_factory):
    """A same-shaped copy of the tiny teacher whose block weights carry a large error (as a compressed copy's
    do) and whose embeddings are exact: what an adapter can correct is all of the difference. (The tiny
    model's 2-bit copy differs mostly in its quantized embeddings, which no adapter touches.)"""
    dest = tmp_path_factory.mktemp("noisy") / "student"
    shutil.copytree(tiny_pair[0], dest)
    weights = mx.load(str(dest / "model.safetensors"))
    mx.random.seed(7)
    for k, w in weights.items():
        if k.endswith("proj.weight"):
            weights[k] = w + 0.5 * w.std() * mx.random.normal(w.shape)
    mx.save_safetensors(str(dest / "model.safetensors"), weights)
    return dest


def adapted(folder, rank=16):
    student, _ = load_model(folder)
    mx.random.seed(0)
    apply_lora(student, KDConfig(lora={"rank": rank}))
    return student


def test_input_covariances_are_the_layers_inputs():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

        def __call__(self, tokens):
            h = self.embed(tokens)
            return self.c(self.a(h) + self.b(h))  # a and b see the same input: one covariance for both

    model = Tiny()
    examples = token_examples(3, 7, 50)
    covs = input_covariances(model, {"a": model.a, "b": model.b, "c": model.c}, examples)
    h = model.embed(mx.array([e.tokens for e in examples])).reshape(-1, 8)
    hc = (model.a(h) + model.b(h))
    assert mx.allclose(covs["a"], h.T @ h, rtol=1e-4, atol=1e-3).item() and mx.array_equal(covs["a"], covs["b"]).item()
    assert mx.allclose(covs["c"], hc.T @ hc, rtol=1e-4, atol=1e-3).item()
    assert all(type(m) is nn.Linear for m in (model.a, model.b, model.c))  # recording classes switched back


def test_input_covariances_restore_the_model_when_its_forward_fails():
    class Failing(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.proj = nn.Embedding(50, 8), nn.Linear(8, 8)

        def __call__(self, tokens):
            self.proj(self.embed(tokens))
            raise RuntimeError("out of memory")

    model = Failing()
    with pytest.raises(RuntimeError, match="out of memory"):
        input_covariances(model, {"proj": model.proj}, [Example((1, 2, 3), 1)])
    assert type(model.proj) is nn.Linear


def test_residual_factors_are_the_best_weighted_rank_r_correction():
    mx.random.seed(1)
    R = mx.random.normal((12, 10))
    X = mx.random.normal((200, 10)) * mx.array([5.0] + [1.0] * 9)  # one loud input channel
    C = X.T @ X
    A, B = residual_factors(R, C, rank=10, scale=2.0)  # full rank: exact
    assert mx.allclose(2.0 * A @ B, R.T, atol=1e-2).item()
    A3, B3 = residual_factors(R, C, rank=3, scale=2.0)
    err = lambda D: float(mx.linalg.norm(X @ (R.T - D)))  # noqa: E731
    plain_u, plain_s, plain_vt = mx.linalg.svd(R.T, stream=mx.cpu)
    plain = (plain_u[:, :3] * plain_s[:3]) @ plain_vt[:3]
    assert err(2.0 * A3 @ B3) < err(plain) < err(mx.zeros_like(R.T))  # weighting by the inputs pays


def test_top_singular_is_near_the_exact_svd_on_a_flat_spectrum():
    rng = np.random.default_rng(1)
    M = rng.standard_normal((576, 1536))  # no decay at all: the hardest case for subspace iteration
    U, S, Vt = top_singular(M, 16)
    U0, S0, Vt0 = np.linalg.svd(M, full_matrices=False)
    ours = np.linalg.norm(M - (U * S) @ Vt)
    exact = np.linalg.norm(M - (U0[:, :16] * S0[:16]) @ Vt0[:16])
    assert exact <= ours < 1.002 * exact
    assert np.allclose(U.T @ U, np.eye(16), atol=1e-8)  # orthonormal, as the SVD's


def test_residual_start_closes_most_of_a_compressed_copys_gap(tiny_pair, noisy_student):
    teacher, _ = load_model(tiny_pair[0])
    examples = token_examples()
    before = compare_to_teacher(adapted(noisy_student), teacher, examples)["kl"]
    student = adapted(noisy_student)
    start = residual_start(student, teacher, examples)
    assert start["layers"] == 4 * 7 and start["same"] == 0 and start["tokens"] == 6 * 24
    after = compare_to_teacher(student, teacher, examples)["kl"]
    assert after < 0.5 * before, (before, after)
    # full rank (the tiny model's widths are 64 and 128): the teacher itself, up to float error
    exact = adapted(noisy_student, rank=64)
    residual_start(exact, teacher, examples)
    assert compare_to_teacher(exact, teacher, examples)["kl"] < 1e-3


def test_residual_start_leaves_identical_layers_and_refuses_other_shapes(tiny_pair, noisy_student):
    teacher, _ = load_model(tiny_pair[0])
    student = adapted(noisy_student)
    first = student.model.layers[0].self_attn.q_proj
    first.linear.weight = teacher.model.layers[0].self_attn.q_proj.weight  # this layer has nothing to correct
    r = residual_start(student, teacher, token_examples(2))
    assert r["layers"] == 27 and r["same"] == 1
    assert float(mx.abs(first.lora_b).max()) == 0  # mlx-lm's start kept: B = 0, random A (still trainable)
    same = adapted(tiny_pair[0])  # the teacher itself (self-distillation): no residual anywhere
    assert "equal the teacher's" in residual_start(same, teacher, token_examples(2))["skipped"]
    other = adapted(tiny_pair[1])  # 2 narrower blocks
    assert "blocks" in residual_start(other, teacher, token_examples(2))["skipped"]
    with pytest.raises(ConfigError, match="same-shaped copy"):
        residual_start(other, teacher, token_examples(2), strict=True)


def test_distiller_starts_from_the_residual_and_the_adapter_loads(tiny_pair, noisy_student, tmp_path):
    def run(init):
        cfg = KDConfig(iters=2, batch_size=2, val_interval=2, checkpoint_interval=2, max_seq_length=48, alpha=1.0,
                       output_dir=str(tmp_path / init), eval_max_new_tokens=0, lora={"init": init},
                       generation={"max_new_tokens": 10, "temperature": 0.0})
        return TrueKnowledgeDistiller(str(tiny_pair[0]), str(noisy_student), cfg).distill_domain("thinking", PROMPTS[:6])

    zero, auto = run("zero"), run("auto")
    assert zero.lora_start is None and auto.lora_start["layers"] == 28
    assert auto.initial_val_kd < 0.5 * zero.initial_val_kd
    # an unset learning rate is settled by the start, and recorded
    assert (zero.config["learning_rate"], auto.config["learning_rate"]) == (LEARNING_RATE["zero"], LEARNING_RATE["residual"])
    from mlx_lm.tuner.utils import load_adapters

    served, _ = load_model(noisy_student)
    load_adapters(served, auto.adapter_path)  # an ordinary mlx-lm adapter
    assert json.loads((Path(auto.adapter_path) / "adapter_config.json").read_text())["lora_parameters"]["rank"] == 16


def test_cli_refuses_a_residual_start_on_another_shape_before_any_work(tiny_pair, tmp_path):
    (tmp_path / "kd.toml").write_text(cli_config(2, 2, 4))
    out = subprocess.run([sys.executable, "-m", "conch_dna.training.kd", "--domain", "thinking", "--teacher", str(tiny_pair[0]),
                          "--student", str(tiny_pair[1]), "--lora-init", "residual", "--config", str(tmp_path / "kd.toml"),
                          "--output", str(tmp_path / "out"), "--no-register"], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "num_hidden_layers 2 (student) vs 4 (teacher)" in out.stderr and "--lora-init zero" in out.stderr
    assert not (tmp_path / "out" / "teacher_cache").exists()  # refused before the teacher wrote anything


def test_benchmark_neurons_start_row(tiny_pair, noisy_student, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_neurons", "benchmarks/benchmark_neurons.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--teacher", str(tiny_pair[0]), "--students", str(noisy_student), "--seeds", "0",
                   "--methods", "untrained", "start", "--max-new-tokens", "8", "--max-seq-length", "160",
                   "--eval-tokens", "8", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "q.md")])
    assert rc == 0
    rows = json.loads((tmp_path / "q.json").read_text())["domains"]["thinking"][str(noisy_student)]
    assert rows["start"][0]["kl"] < 0.5 * rows["untrained"][0]["kl"]
    assert "| start |" in (tmp_path / "q.md").read_text()
