"""A tiny run of scripts/benchmark_neurons.py (the real one runs for minutes to hours; docs/quality.md)."""

import importlib.util
import json

from conch_dna.training.kd.evaluate import compare_to_teacher, text_perplexity


def test_benchmark_neurons_tiny(tiny_pair, tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bench_neurons", "scripts/benchmark_neurons.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = tmp_path / "text.txt"
    text.write_text("Knowledge distillation trains a small student to match a large teacher. " * 20)
    rc = mod.main(["--teacher", str(tiny_pair[0]), "--student", str(tiny_pair[1]), "--seeds", "0", "1", "--iters", "2",
                   "--methods", "untrained", "sft", "kd", "on_policy", "--max-new-tokens", "8", "--max-seq-length", "160",
                   "--text", str(text), "--text-tokens", "64", "--work", str(tmp_path / "work"),
                   "--out", str(tmp_path / "quality.md")])
    assert rc == 0
    report = (tmp_path / "quality.md").read_text()
    for method in ("teacher", "untrained", "sft", "kd", "on_policy"):
        assert f"| {method} |" in report
    data = json.loads((tmp_path / "quality.json").read_text())["results"]["thinking"]
    assert len(data["kd"]) == 2 and data["teacher"][0]["kl"] == 0.0 and data["teacher"][0]["agreement"] == 1.0


def test_evaluation_functions_are_consistent(tiny_pair):
    from conch_dna.models import load_model
    from conch_dna.training.kd.data import Example

    t, tok = load_model(tiny_pair[0])
    s, _ = load_model(tiny_pair[1])
    ex = [Example(tuple(tok.encode("think step by step about the apples")), 3)]
    same = compare_to_teacher(t, t, ex)
    other = compare_to_teacher(s, t, ex)
    assert same["kl"] == 0.0 and same["agreement"] == 1.0 and other["kl"] > 0
    assert text_perplexity(t, tok, "the quick brown fox jumps over the lazy dog")["ppl"] > 1
