"""A tiny run of benchmarks/benchmark_neurons.py (the real one runs for minutes to hours)."""

import importlib.util
import json

import pytest

from conch_dna.training.kd.evaluate import compare_to_teacher, text_perplexity


def test_benchmark_neurons_tiny(tiny_pair, tmp_path):
    from conch_dna.training.kd import load_domains
    from conch_dna.training.kd.domains import load_held_out

    spec = importlib.util.spec_from_file_location("bench_neurons", "benchmarks/benchmark_neurons.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    judge = tmp_path / "judge"
    judge.mkdir()
    (judge / "thinking.txt").write_text("Is 77 a prime number?\nHow many legs do three spiders have?\n")
    rc = mod.main(["--teacher", str(tiny_pair[0]), "--students", str(tiny_pair[1]), "--seeds", "0", "1", "--iters", "2",
                   "--methods", "untrained", "sft", "kd", "on_policy", "fast", "--set", "fast", "learning_rate=1e-3",
                   "temperature=1", "--max-new-tokens", "8", "--max-seq-length", "160", "--eval-tokens", "8",
                   "--judge-dir", str(judge), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "quality.md")])
    assert rc == 0
    report = (tmp_path / "quality.md").read_text()
    for method in ("untrained", "sft", "kd", "on_policy", "fast"):
        assert f"| {method} |" in report
    data = json.loads((tmp_path / "quality.json").read_text())
    runs = data["domains"]["thinking"][str(tiny_pair[1])]
    assert len(runs["kd"]) == 2 and len(runs["untrained"]) == 1
    assert {"kl", "agreement", "repetition", "teacher_nll", "eos_rate"} <= set(runs["kd"][0])
    assert data["methods"]["fast"] == {"learning_rate": 1e-3, "temperature": 1}
    judged = len(load_held_out("thinking")) + 2  # the domain's held-out prompts and the judge file's
    assert data["domains"]["thinking"]["teacher"]["prompts"] == judged and f"{judged} held-out prompts" in report
    assert all(len(r["repetitions"]) == judged for runs_ in runs.values() for r in runs_)
    assert data["cost"][str(tiny_pair[1])]["weight_bytes"] > 0 and data["cost"]["teacher"]["tokens_per_second"] > 0
    with pytest.raises(SystemExit):
        mod.main(["--methods", "nonsense"])
    (judge / "thinking.txt").write_text(load_domains()["thinking"][0] + "\n")  # a training prompt: refused
    with pytest.raises(SystemExit):
        mod.main(["--teacher", "no-such-model", "--judge-dir", str(judge)])


def test_evaluation_functions_are_consistent(tiny_pair):
    from conch_dna.models import load_model
    from conch_dna.training.kd.examples import Example

    t, tok = load_model(tiny_pair[0])
    s, _ = load_model(tiny_pair[1])
    ex = [Example(tuple(tok.encode("think step by step about the apples")), 3)]
    same = compare_to_teacher(t, t, ex)
    other = compare_to_teacher(s, t, ex)
    assert same["kl"] == 0.0 and same["agreement"] == 1.0 and other["kl"] > 0
    assert text_perplexity(t, tok, "the quick brown fox jumps over the lazy dog")["ppl"] > 1


def test_evaluate_neuron_script(tiny_pair, tmp_path, capsys):
    from conch_dna.cortex import NeuronRegistry
    from conch_dna.training.kd import KDConfig, TrueKnowledgeDistiller
    from tests.conftest import PROMPTS

    cfg = KDConfig(iters=2, batch_size=2, val_interval=2, checkpoint_interval=2, max_seq_length=64,
                   output_dir=str(tmp_path / "out"), generation={"max_new_tokens": 8}, eval_max_new_tokens=0)
    r = TrueKnowledgeDistiller(str(tiny_pair[0]), str(tiny_pair[1]), cfg).distill_domain("thinking", PROMPTS[:4])
    NeuronRegistry(tmp_path / "reg", base_model=str(tiny_pair[1])).register("thinking", r.adapter_path)
    spec = importlib.util.spec_from_file_location("evaluate_neuron", "scripts/evaluate_neuron.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    capsys.readouterr()
    assert mod.main(["--teacher", str(tiny_pair[0]), "--student", str(tiny_pair[1]), "--registry", str(tmp_path / "reg"),
                     "--max-new-tokens", "8", "--answers", "1"]) == 0
    out = capsys.readouterr().out
    assert "| teacher | 0.000 [0.000, 0.000] | 1.000 [1.000, 1.000] |" in out and "| untrained student |" in out
    assert "| neuron v1 (active) |" in out and "over the teacher's" in out
    assert out.count("- **") == 3  # one answer of each model, side by side
