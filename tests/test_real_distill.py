"""The real default teacher (SmolLM2-135M-Instruct) and its students, few steps, short sequences."""

import json
import os

import pytest

from conch_dna.training.kd import KDConfig, TrueKnowledgeDistiller
from conch_dna.training.kd.vocab import check_same_tokenizer


@pytest.mark.real_model
def test_validation_kd_loss_decreases_on_the_real_pruned_student(default_pair, tmp_path):
    from conch_dna.models.defaults import STUDENT_NAME, prepare_student

    teacher, _ = default_pair
    student = prepare_student(STUDENT_NAME, os.environ.get("CONCH_CACHE_DIR"))
    prompts = [
        "Why does ice float on water?", "What is 17 times 3? Explain.", "Name three primary colours.",
        "What does a compiler do?", "Why do leaves change colour in autumn?", "What is a prime number?",
        "How do bees make honey?", "What is the boiling point of water at sea level?",
        "Explain what a variable is in programming.", "Why is the sea salty?",
    ]
    cfg = KDConfig(
        iters=8, batch_size=4, learning_rate=1e-3, val_interval=8, checkpoint_interval=8, val_fraction=0.3,
        max_seq_length=96, output_dir=str(tmp_path), lora={"rank": 8}, eval_max_new_tokens=0,
        generation={"max_new_tokens": 40, "batch_size": 10, "temperature": 0.0},
    )
    r = TrueKnowledgeDistiller(str(teacher), str(student), cfg).distill_domain("thinking", prompts)
    curve = [json.loads(x) for x in (tmp_path / "thinking/metrics.jsonl").read_text().splitlines()]
    val = {row["step"]: row["val_kd"] for row in curve if row["type"] == "val"}
    print("validation KD by step:", val)
    assert set(val) == {0, 8}
    assert val[8] < 0.9 * val[0], val
    assert r.initial_val_kd == pytest.approx(val[0]) and r.val_agreement > 0


@pytest.mark.real_model
def test_default_pair_shares_the_tokenizer(default_pair):
    from conch_dna.models import load_model

    _, t_tok = load_model(default_pair[0])
    _, s_tok = load_model(default_pair[1])
    figures = check_same_tokenizer(t_tok, s_tok)
    assert figures["teacher_vocab"] == figures["student_vocab"] == 49152


@pytest.mark.real_model
def test_the_default_4bit_student_starts_close_to_the_teacher(default_pair):
    """The held-out judgement on real models: the untrained 4-bit copy is near the teacher, the 16-layer
    pruned copy far from it (docs/benchmarks.md has the students' table)."""
    from conch_dna.models import load_model
    from conch_dna.training.kd.domains import load_held_out
    from conch_dna.training.kd.evaluate import answer, generation_metrics

    teacher, tok = load_model(default_pair[0])
    student, _ = load_model(default_pair[1])
    prompts = load_held_out("thinking")[:4]
    t_answers = answer(teacher, tok, prompts, 32)
    g = generation_metrics(student, teacher, tok, prompts, teacher_answers=t_answers, max_new_tokens=32)
    assert g["kl"] < 0.5 and g["agreement"] > 0.65, g
