"""A tiny run of benchmarks/benchmark_neurons.py (the real one runs for minutes to hours)."""

import importlib.util
import json

import pytest

from conch_dna.training.kd.evaluate import compare_to_teacher, text_perplexity


def _load_script(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_neurons_tiny(tiny_pair, tmp_path):
    from conch_dna.training.kd import load_domains
    from conch_dna.training.kd.domains import load_held_out

    mod = _load_script("bench_neurons", "benchmarks/benchmark_neurons.py")
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
    assert 0 < data["cost"][str(tiny_pair[1])]["flops_per_token"] < data["cost"]["teacher"]["flops_per_token"]
    one = runs["untrained"][0]  # one run: its intervals and the gate's verdict are in the table
    assert one["kl_low"] <= one["kl"] <= one["kl_high"] and "repetition_excess_high" in one
    assert f"| {one['kl']:.3f} [{one['kl_low']:.3f}, {one['kl_high']:.3f}] |" in report
    assert mod.gate_verdict(one) in report.split(f"| {tiny_pair[1]} | untrained |")[1].splitlines()[0]
    assert mod.gate_verdict({"repetition_excess": 0.2, "repetition_excess_low": 0.1, "repetition_excess_high": 0.3}) == "loops"
    assert mod.gate_verdict({"repetition_excess": 0.04, "repetition_excess_low": 0.0, "repetition_excess_high": 0.09}) == "may loop"
    assert mod.gate_verdict({"repetition_excess": 0.0, "repetition_excess_low": -0.02, "repetition_excess_high": 0.03}) == "passes"
    with pytest.raises(SystemExit):
        mod.main(["--methods", "nonsense"])
    (judge / "thinking.txt").write_text(load_domains()["thinking"][0] + "\n")  # a training prompt: refused
    with pytest.raises(SystemExit):
        mod.main(["--teacher", "no-such-model", "--judge-dir", str(judge)])


def test_benchmark_neurons_costs_only_with_alternated_speed_repeats(tiny_pair, tmp_path):
    import statistics

    mod = _load_script("bench_neurons", "benchmarks/benchmark_neurons.py")
    out = tmp_path / "cost.md"
    assert mod.main(["--teacher", str(tiny_pair[0]), "--students", str(tiny_pair[1]), "--domains", "--speed-repeats", "3",
                     "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["domains"] == {}
    for cost in data["cost"].values():
        assert len(cost["tokens_per_second_all"]) == 3 and cost["tokens_per_second"] == statistics.median(cost["tokens_per_second_all"])
    low, high = min(data["cost"]["teacher"]["tokens_per_second_all"]), max(data["cost"]["teacher"]["tokens_per_second_all"])
    assert f"({low:.1f}-{high:.1f})" in out.read_text()


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
    mod = _load_script("evaluate_neuron", "scripts/evaluate_neuron.py")
    capsys.readouterr()
    assert mod.main(["--teacher", str(tiny_pair[0]), "--student", str(tiny_pair[1]), "--registry", str(tmp_path / "reg"),
                     "--max-new-tokens", "8", "--answers", "1"]) == 0
    out = capsys.readouterr().out
    assert "| teacher | 0.000 [0.000, 0.000] | 1.000 [1.000, 1.000] |" in out and "| untrained student |" in out
    assert "| neuron v1 (active) |" in out and "over the teacher's" in out
    assert out.count("- **") == 3  # one answer of each model, side by side


def test_corpus_kd_curve_with_teacher_answers_stops_and_resumes(tiny_pair, tmp_path):
    """The healing curve mixes corpus windows with the teacher's answers to a prompt file, stops cleanly when
    its time is up and continues with --resume; each kept checkpoint is judged once."""
    mod = _load_script("corpus_kd_curve", "benchmarks/corpus_kd_curve.py")
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(f"The function number {i} returns a list of {i % 7} items sorted by name." for i in range(900)))
    prompts = tmp_path / "chat.txt"
    prompts.write_text("What is a list?\nHow do I sort names?\nWhy use a dictionary?\nWhat does return do?\n")
    args = ["--teacher", str(tiny_pair[0]), "--student", str(tiny_pair[1]), "--text", str(text), "--prompts", str(prompts),
            "--text-share", "0.5", "--tokens", str(8 * 4 * 64), "--points", "2", "--batch-size", "4", "--max-seq-length", "64",
            "--lora-rank", "4", "--eval-tokens", "4", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "curve")]
    assert mod.main([*args, "--max-seconds", "0"]) == 0  # stops before its first step: only the start is judged
    first = json.loads((tmp_path / "curve.json").read_text())
    assert [p["step"] for p in first["curve"]] == [0] and first["tokens_per_second"] is None
    assert mod.main([*args, "--resume"]) == 0
    curve = json.loads((tmp_path / "curve.json").read_text())["curve"]
    assert [p["step"] for p in curve] == [0, 4, 8]
    assert 0 < curve[1]["tokens"] < curve[2]["tokens"] <= 8 * 4 * 64
    assert all({"kl", "kl_low", "kl_high", "agreement", "repetition"} <= set(p) for p in curve)
    rows = [json.loads(line) for line in (tmp_path / "work" / "corpus" / "metrics.jsonl").read_text().splitlines()]
    answers = [r for r in rows if r["type"] == "train"]
    assert answers and curve[2]["tokens"] == mod.tokens_by_step(rows)[8]


def test_corpus_kd_curve_on_policy_with_domain_prompts_judges_every_domain_asked(tiny_pair, tmp_path):
    """Domain prompts answered twice each, the student writing half the answers as it trains, and the last
    checkpoint judged on two domains' held-out prompts with the gate's verdict."""
    mod = _load_script("corpus_kd_curve", "benchmarks/corpus_kd_curve.py")
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(f"The function number {i} returns a list of {i % 7} items sorted by name." for i in range(900)))
    args = ["--teacher", str(tiny_pair[0]), "--student", str(tiny_pair[1]), "--text", str(text), "--prompts", "thinking",
            "--answers", "2", "--on-policy", "0.5", "--unlikelihood", "1", "--text-share", "0.5", "--tokens", str(4 * 4 * 192),
            "--points", "1", "--batch-size", "4", "--max-seq-length", "192", "--lora-rank", "4", "--eval-tokens", "4",
            "--judge-domains", "thinking", "task", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "curve")]
    assert mod.main(args) == 0
    result = json.loads((tmp_path / "curve.json").read_text())
    assert set(result["domains"]) == {"thinking", "task"}
    for figures in result["domains"].values():
        assert figures["gate"] in ("passes", "may loop", "loops") and figures["repetition_excess_high"] >= figures["repetition_excess_low"]
    saved = json.loads((tmp_path / "work" / "corpus" / "adapter_config.json").read_text())
    assert saved["conch_kd"]["on_policy_lambda"] == 0.5 and saved["conch_kd"]["unlikelihood"] == 1


def test_gather_prompts_reads_domains_and_files(tmp_path):
    from conch_dna.training.kd.domains import gather_prompts, load_domains

    f = tmp_path / "p.txt"
    f.write_text("one\ntwo\n")
    domains = {"a": ["x", "y"], "b": ["z"]}
    assert gather_prompts(["b", str(f)], domains) == ["z", "one", "two"]
    assert gather_prompts(["all"], domains) == ["x", "y", "z"]
    assert gather_prompts(["thinking"]) == load_domains()["thinking"]


def test_tokens_by_step_continues_across_a_resume():
    mod = _load_script("corpus_kd_curve", "benchmarks/corpus_kd_curve.py")
    rows = [{"type": "train", "step": 1, "tokens": 100}, {"type": "val", "step": 1}, {"type": "train", "step": 2, "tokens": 250},
            {"type": "train", "step": 3, "tokens": 120}, {"type": "train", "step": 4, "tokens": 200}]  # resumed after step 2
    assert mod.tokens_by_step(rows) == {1: 100, 2: 250, 3: 370, 4: 450}


def test_a_healing_in_stages_joins_into_one_curve(tiny_pair, tmp_path):
    """Stage two heals the fused result of stage one (only the adapter carried between them); --join makes one
    curve whose tokens count on, and stage two's start, the fused student, is judged as stage one ended."""
    from conch_dna.models.fuse import fuse_adapter

    mod = _load_script("corpus_kd_curve", "benchmarks/corpus_kd_curve.py")
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(f"The function number {i} returns a list of {i % 7} items sorted by name." for i in range(900)))

    def stage(student, name):
        args = ["--teacher", str(tiny_pair[0]), "--student", str(student), "--text", str(text), "--tokens", str(4 * 4 * 64),
                "--points", "1", "--batch-size", "4", "--max-seq-length", "64", "--lora-rank", "4", "--eval-tokens", "4",
                "--work", str(tmp_path / name), "--out", str(tmp_path / name)]
        assert mod.main(args) == 0
        return json.loads((tmp_path / f"{name}.json").read_text())

    one = stage(tiny_pair[1], "one")
    two = stage(fuse_adapter(tiny_pair[1], tmp_path / "one" / "corpus", tmp_path / "fused"), "two")
    assert two["curve"][0]["kl"] == pytest.approx(one["curve"][-1]["kl"], abs=1e-3)
    assert mod.main(["--join", str(tmp_path / "one.json"), str(tmp_path / "two.json"), "--out", str(tmp_path / "both")]) == 0
    both = json.loads((tmp_path / "both.json").read_text())
    tokens = [p["tokens"] for p in both["curve"]]
    assert len(both["curve"]) == len(one["curve"]) + len(two["curve"]) - 1 and tokens == sorted(tokens)
    assert tokens[-1] == one["curve"][-1]["tokens"] + two["curve"][-1]["tokens"]
    assert both["curve"][-1]["kl"] == two["curve"][-1]["kl"] and both["runs"] == [one["args"], two["args"]]
    (tmp_path / "other.json").write_text(json.dumps({**two, "args": {**two["args"], "domain": "memory"}}))
    with pytest.raises(SystemExit):  # judged on another domain's prompts: not one curve
        mod.main(["--join", str(tmp_path / "one.json"), str(tmp_path / "other.json"), "--out", str(tmp_path / "mixed")])


def test_students_table_reads_both_result_formats_and_gives_the_gate(tmp_path, capsys):
    mod = _load_script("students_table", "benchmarks/students_table.py")
    good = {"kl": 0.1, "kl_low": 0.09, "kl_high": 0.11, "agreement": 0.8, "repetition": 0.05, "repetition_excess": 0.0,
            "repetition_excess_low": -0.02, "repetition_excess_high": 0.02, "repetition_low": 0.03, "repetition_high": 0.07}
    looping = {**good, "repetition": 0.3, "repetition_excess": 0.25, "repetition_excess_low": 0.2, "repetition_excess_high": 0.3}
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"domains": {d: {"teacher": {"repetition": 0.05}, "s": {"kd": [looping], "sft": [good]}}
                                             for d in ("task", "memory")}}))
    every = tmp_path / "all.json"
    every.write_text(json.dumps({"domains": [{"domain": "task", "held_out": {**good, "teacher_repetition": 0.05}},
                                             {"domain": "debug", "held_out": None}]}))
    assert mod.main([f"main job={every}", f"kd={bench}#s/kd@memory", f"sft={bench}#s/sft"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[0], r[1], r[-1]) for r in rows] == [
        ("| task", "main job", "passes |"), ("| task", "sft", "passes |"),
        ("| memory", "kd", "loops |"), ("| memory", "sft", "passes |")]
    assert rows[0][2] == "0.100 [0.090, 0.110]" and rows[2][5] == "+0.250 [+0.200, +0.300]"
    for bad in ("no-equals", f"x={tmp_path / 'missing.json'}", f"x={bench}#nomethod", f"x={bench}#other/kd"):
        assert mod.main([bad]) == 2


def test_benchmark_generation_compares_both_decoding_settings(tiny_pair, tmp_path, capsys):
    mod = _load_script("benchmark_generation", "benchmarks/benchmark_generation.py")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"What is {i} times {i}?" for i in range(40)) + "\n")
    assert mod.main(["--teacher", str(tiny_pair[0]), "--prompts", str(prompts), "--batch-size", "40",
                     "--max-new-tokens", "4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "40 answers, batch 40" in out
    assert "mlx-lm default (32 at a time): " in out and "whole batch together: " in out
    from conch_dna.training.kd import examples

    assert examples.decode_together(40) == {"completion_batch_size": 40}  # put back after the comparison
