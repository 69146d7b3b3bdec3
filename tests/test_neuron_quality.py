"""What a user sees of a neuron: generation metrics, the quality gate that reads them, quantized students,
and corpus KD streaming. Tiny random-weight models built in the test."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conch_dna.cortex import NeuronRegistry
from conch_dna.cortex.registry import loops, worse_than
from conch_dna.models import cast_floating, load_model
from conch_dna.models.defaults import quantize_folder, weight_bytes
from conch_dna.neuron import DataError
from conch_dna.training.kd import KDConfig, TrueKnowledgeDistiller
from conch_dna.training.kd.corpus import CorpusWithAnswers, corpus_windows, tokenize_corpus
from conch_dna.training.kd.domains import load_held_out
from conch_dna.training.kd.evaluate import answer, generation_metrics, repeated_ngram_share
from tests.conftest import PROMPTS


def test_repeated_ngram_share():
    assert repeated_ngram_share([list(range(40))]) == 0.0
    assert repeated_ngram_share([[7] * 20]) == pytest.approx(16 / 17)
    # a phrase said five times: only its 5 distinct 4-grams are new
    phrase = [5, 6, 7, 8, 9]
    assert repeated_ngram_share([phrase * 5]) == pytest.approx((22 - 5) / 22)  # 22 4-grams, 5 distinct
    # pooled over answers; an answer shorter than n contributes nothing
    assert repeated_ngram_share([[1, 2], list(range(10)), [3] * 7]) == pytest.approx(3 / (7 + 4))
    assert repeated_ngram_share([]) == 0.0


def looping_model(folder):
    """The tiny model with its final norm zeroed: every logit is 0, greedy decoding repeats token 0 forever."""
    model, tok = load_model(folder)
    model.model.norm.weight = mx.zeros_like(model.model.norm.weight)
    return model, tok


def test_generation_metrics_flag_a_looping_model(tiny_pair):
    teacher_dir, _ = tiny_pair
    teacher, tok = load_model(teacher_dir)
    stub, _ = looping_model(teacher_dir)
    prompts = PROMPTS[:4]
    teacher_answers = answer(teacher, tok, prompts, 24)
    own = generation_metrics(teacher, teacher, tok, prompts, teacher_answers=teacher_answers, max_new_tokens=24)
    assert own["kl"] == pytest.approx(0.0, abs=1e-5) and own["agreement"] == 1.0
    loop = generation_metrics(stub, teacher, tok, prompts, teacher_answers=teacher_answers, max_new_tokens=24)
    assert loop["repetition"] == pytest.approx(20 / 21)  # 24 copies of one token: 21 4-grams, 1 distinct
    assert loop["eos_rate"] == 0.0 and len(loop["answers"]) == 4
    assert loop["repetitions"] == [pytest.approx(20 / 21)] * 4  # each answer's own share; pooled equal here
    assert loop["kl"] > own["kl"] + 0.1 and loop["teacher_nll"] > 0
    with pytest.raises(ValueError, match="at least one held-out prompt"):
        generation_metrics(stub, teacher, tok, [])


def test_quality_gate_refuses_loops_and_regressions(tiny_pair, tmp_path):
    teacher_dir, student_dir = tiny_pair
    distiller_cfg = KDConfig(iters=2, batch_size=2, val_interval=2, checkpoint_interval=2, max_seq_length=48,
                             output_dir=str(tmp_path / "out"), generation={"max_new_tokens": 8, "temperature": 0.0},
                             eval_max_new_tokens=0)
    folders = []
    for seed in (0, 1, 2, 3):
        d = TrueKnowledgeDistiller(str(teacher_dir), str(student_dir), distiller_cfg.model_copy(update={"seed": seed}))
        folders.append(d.distill_domain(f"n{seed}", PROMPTS[:4]).adapter_path)
    good = {"held_out_kl": 0.30, "held_out_agreement": 0.80, "held_out_repetition": 0.10, "held_out_teacher_repetition": 0.08}
    reg = NeuronRegistry(tmp_path / "reg", base_model=str(student_dir), quality_gate=True)
    looping = {**good, "held_out_repetition": 0.60}
    assert "loops" in loops(looping) and loops(good) is None
    v1 = reg.register("thinking", folders[0], metrics=looping)
    assert reg.active("thinking") is None and v1.version == 1  # a looping first version is kept, not served
    reg.register("thinking", folders[1], metrics=good)
    assert reg.active("thinking").version == 2
    worse = {**good, "held_out_kl": 0.5}
    assert "KL" in worse_than(worse, good)
    reg.register("thinking", folders[2], metrics=worse)
    assert reg.active("thinking").version == 2  # the gate kept v3 inactive
    with pytest.raises(Exception, match="worse than active version 2"):
        reg.promote("thinking", 3)
    within_noise = {**good, "held_out_kl": 0.31, "held_out_repetition": 0.11}
    reg.register("thinking", folders[3], metrics=within_noise)
    assert reg.active("thinking").version == 4


def test_quantized_student_trains_and_loads_in_stock_mlx_lm(tiny_pair, tmp_path):
    from mlx_lm import load as mlx_load

    teacher_dir, _ = tiny_pair
    # 2 bits: damaged enough that KD has something to repair in three steps
    q = quantize_folder(Path(teacher_dir), tmp_path / "q2", bits=2, group_size=32)
    cfg = json.loads((q / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 32, "bits": 2, "mode": "affine"}
    assert weight_bytes(q) < 0.2 * weight_bytes(teacher_dir)  # float32 teacher; 3 bits per weight
    # A zero start: KD repairs the 2-bit copy itself (the residual start is tested in test_lora_init.py)
    config = KDConfig(iters=3, batch_size=2, val_interval=3, checkpoint_interval=3, max_seq_length=48, learning_rate=5e-3,
                      alpha=1.0, output_dir=str(tmp_path / "out"), eval_max_new_tokens=8, lora={"init": "zero"},
                      generation={"max_new_tokens": 8, "temperature": 0.0},
                      # the random teacher's answers loop all through; the loop terms would train away from it
                      own_answers="off", unlikelihood=0.0, no_repeat_teacher=False)
    d = TrueKnowledgeDistiller(str(teacher_dir), str(q), config)
    r = d.distill_domain("thinking", PROMPTS[:6], held_out=PROMPTS[6:8])
    assert r.final_val_kd < r.initial_val_kd
    assert {"kl", "agreement", "repetition", "teacher_repetition", "teacher_nll", "eos_rate"} <= set(r.held_out)
    assert r.cost["student_weight_bytes"] == weight_bytes(q) and 0 < r.cost["share_of_teacher_bf16"] < 1
    # Stock mlx-lm: the quantized base (QuantizedLinear kept) with our adapter on top.
    model, tok = mlx_load(str(q), adapter_path=r.adapter_path)
    assert any(isinstance(m, nn.QuantizedLinear) for m in model.modules())
    cast_floating(model, mx.float32)  # its float16 scales: compare in float32
    ours, _ = load_model(q)  # dequantized on the CPU: the same function
    from mlx_lm.tuner.utils import load_adapters

    load_adapters(ours, r.adapter_path)
    x = mx.array([[5, 17, 33, 60, 2, 9]])
    assert float(mx.abs(model(x).astype(mx.float32) - ours(x)).max()) < 1e-3
    # adapter_config.json names a model stock mlx-lm can load: its generate command runs as written
    import subprocess
    import sys

    named = json.loads((Path(r.adapter_path) / "adapter_config.json").read_text())["model"]
    assert named == str(q.resolve())
    out = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", named, "--adapter-path", r.adapter_path,
                          "--prompt", "hello", "--max-tokens", "4"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_tokenize_corpus_streams_and_caches(tiny_pair, tmp_path, monkeypatch):
    import conch_dna.training.kd.corpus as corpus

    _, tok = load_model(tiny_pair[0])
    src = tmp_path / "text"
    (src / "sub").mkdir(parents=True)
    texts = ["The quick brown fox jumps over the lazy dog.\n" * 40, "def add(a, b):\n    return a + b\n" * 30]
    (src / "a.txt").write_text(texts[0])
    (src / "sub" / "b.py").write_text(texts[1])
    (src / "image.png").write_bytes(bytes(range(256)) * 4)  # not text: skipped
    (src / ".hidden").write_text("never read")
    monkeypatch.setattr(corpus, "CHUNK_CHARS", 100)  # many chunks per file
    path = tokenize_corpus(tok, src, tmp_path / "cache", eos=2)
    ids = np.fromfile(path, dtype=np.uint32)
    docs = np.split(ids, np.where(ids == 2)[0] + 1)
    assert [tok.decode(d[d != 2].tolist()) for d in docs if len(d)] == texts
    mtime = path.stat().st_mtime_ns
    assert tokenize_corpus(tok, src, tmp_path / "cache", eos=2) == path and path.stat().st_mtime_ns == mtime  # cached
    capped = tokenize_corpus(tok, src, tmp_path / "capped", max_tokens=50)
    assert len(np.fromfile(capped, dtype=np.uint32)) == 50
    train, val = corpus_windows(path, 16, val_windows=3)
    assert len(val) == 3 and len(train) == len(ids) // 16 - 3
    assert train[0].tokens == tuple(int(t) for t in ids[:16]) and train[0].prompt_len == 0
    assert val[0].tokens == tuple(int(t) for t in ids[len(train) * 16 : len(train) * 16 + 16])
    assert isinstance(train._ids, np.memmap)  # read from disk, never loaded whole
    with pytest.raises(DataError, match="fewer than one window"):
        corpus_windows(capped, 64, 1)
    with pytest.raises(DataError, match="does not exist"):
        tokenize_corpus(tok, tmp_path / "missing", tmp_path / "c2")


def test_mixed_share():
    corpus = list(range(1000))
    answers = ["a", "b", "c", "d"]
    mixed = CorpusWithAnswers(corpus, answers, 0.25)
    share = sum(isinstance(mixed[i], str) for i in range(len(mixed))) / len(mixed)
    assert share == pytest.approx(0.25, abs=0.01)
    assert mixed[len(corpus)] == "a" and mixed[-1] in answers


def test_corpus_kd_alone_and_mixed(tiny_pair, tmp_path):
    teacher_dir, student_dir = tiny_pair
    text = tmp_path / "corpus.txt"
    text.write_text("Knowledge distillation trains a small student to match a teacher. " * 200)
    base = dict(iters=6, batch_size=2, val_interval=3, checkpoint_interval=3, max_seq_length=48, learning_rate=5e-3, alpha=1.0,
                generation={"max_new_tokens": 8, "temperature": 0.0}, eval_max_new_tokens=0, text=str(text),
                text_val_windows=2)
    alone = TrueKnowledgeDistiller(str(teacher_dir), str(student_dir),
                                   KDConfig(**base, text_share=1.0, output_dir=str(tmp_path / "a")))
    r = alone.distill_domain("corpus-only", [])
    assert r.generation["samples"] == 0 and r.tokens_processed == 6 * 2 * 47
    assert r.num_val_samples == 2 and r.final_val_kd < r.initial_val_kd
    mixed = TrueKnowledgeDistiller(str(teacher_dir), str(student_dir),
                                   KDConfig(**base, text_share=0.5, output_dir=str(tmp_path / "m")))
    r2 = mixed.distill_domain("mixed", PROMPTS[:6])
    assert r2.generation["samples"] == 6 and r2.num_train_samples > 6
    with pytest.raises(ValueError, match="teacher_targets = 'online'"):
        KDConfig(**base, teacher_targets="cache")


def test_on_policy_beside_a_corpus_answers_prompts_only(tiny_pair, tmp_path, monkeypatch):
    """The student writes answers to prompts; corpus windows (no prompt) are trained on as they are."""
    from conch_dna.training.kd import distiller

    teacher_dir, student_dir = tiny_pair
    text = tmp_path / "corpus.txt"
    text.write_text("Knowledge distillation trains a small student to match a teacher. " * 200)
    asked = []
    real = distiller.continue_prompts
    monkeypatch.setattr(distiller, "continue_prompts", lambda m, t, ex, *a, **k: asked.append(ex) or real(m, t, ex, *a, **k))
    cfg = KDConfig(iters=6, batch_size=4, val_interval=3, checkpoint_interval=3, max_seq_length=48, learning_rate=5e-3,
                   generation={"max_new_tokens": 8, "temperature": 0.0}, eval_max_new_tokens=0, text=str(text),
                   text_share=0.5, text_val_windows=2, on_policy_lambda=1.0, output_dir=str(tmp_path / "o"))
    r = TrueKnowledgeDistiller(str(teacher_dir), str(student_dir), cfg).distill_domain("mixed", PROMPTS[:6])
    assert np.isfinite(r.final_train_loss) and asked
    assert all(e.prompt_len > 0 for batch in asked for e in batch)


def test_held_out_prompts_are_not_training_prompts(tmp_path):
    assert len(load_held_out("thinking")) >= 8
    f = tmp_path / "d.toml"
    f.write_text('[x]\nprompts = ["a", "b"]\nheld_out = ["b"]\n')
    with pytest.raises(DataError, match="also a training prompt"):
        load_held_out("x", f)
    assert load_held_out("nope", f) == []


def test_the_teacher_decodes_a_whole_generation_batch_at_once(tiny_pair, kd_config, monkeypatch):
    """generation.batch_size prompts are decoded together (mlx-lm's BatchGenerator would take 32 at a time),
    and so are the held-out prompts a judge answers."""
    from conch_dna.models import load_model
    from conch_dna.training.kd.evaluate import answer
    from conch_dna.training.kd.examples import generate_examples

    model, tok = load_model(str(tiny_pair[0]))
    rows = []
    forward = type(model).__call__
    monkeypatch.setattr(type(model), "__call__", lambda self, x, *a, **k: rows.append(x.shape[0]) or forward(self, x, *a, **k))
    prompts = [f"Question number {i}: what is {i} plus {i}?" for i in range(40)]
    examples, _ = generate_examples(model, tok, prompts, kd_config(generation={"max_new_tokens": 16, "batch_size": 40}))
    assert len(examples) == 40 and max(rows) == 40
    rows.clear()
    answer(model, tok, prompts, max_new_tokens=16, batch_size=40)
    assert max(rows) == 40
