#!/usr/bin/env python
"""Neurons as a user sees them: students x methods x seeds, judged on held-out prompts, with their cost.

    python benchmarks/benchmark_neurons.py --domains thinking --students default-student \\
        --methods untrained sft kd --seeds 0 1 2 --out /tmp/neurons.md

Every method trains on the same teacher answers to the domain's training prompts with the same budget (the
README main command's: 15 steps x batch 4, LoRA rank 16 on attention + MLP, answers of up to 96 tokens,
sequences of 256). Each neuron is then judged on the domain's `held_out` prompts (config/domains.toml,
never trained on) by `evaluate.generation_metrics`: KL(teacher || neuron) and top-1 agreement on the
teacher's greedy answers; on its own greedy answers, repeated 4-grams, the teacher's NLL and the share that
end with EOS. "KL gap closed" is (untrained - neuron) / untrained. Cost: weight bytes of the base (+ adapter)
against the teacher's in bf16, and single-stream generation tokens/s on this machine.
`--set name key=value ...` adds a method (e.g. `--set lr1e3 learning_rate=1e-3 temperature=1`). Method
`untrained` is the student as it is; `start` is its adapter's residual start (lora.init) before any step.
`--judge-dir benchmarks/judge` adds DIR/<domain>.txt's prompts (one per line, none a training prompt) to the
domain's held-out prompts: repetition on 10 prompts varies between seeds as much as between methods.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import conch_dna  # noqa: E402,F401

PLAIN = dict(own_answers="off", unlikelihood=0.0, no_repeat_teacher=False)  # no loop terms
METHODS = {
    "sft": dict(alpha=0.0, **PLAIN),  # CE on the teacher's answers, nothing else
    "kd": dict(),  # the defaults (config/kd.toml): what the main command runs
    "kd_plain": dict(PLAIN),  # the defaults without the loop terms
    "reverse_kl": dict(divergence="reverse_kl"),
    "jsd": dict(divergence="jsd"),
    "on_policy": dict(on_policy_lambda=0.5),
}
FIGURES = ("kl", "agreement", "repetition", "teacher_nll", "eos_rate")
# 90% intervals over prompts (evaluate.intervals): what the registry's gate decides on
INTERVAL_FIGURES = tuple(f"{k}_{end}" for k in ("kl", "agreement", "repetition", "repetition_excess") for end in ("low", "high"))
SAVED = (*FIGURES, "repetition_excess", *INTERVAL_FIGURES)


def gate_verdict(figures: dict) -> str:
    """The registry gate's loop verdict on these held-out figures: "passes", "may loop" or "loops"."""
    from conch_dna.cortex.registry import held_out_verdict

    return held_out_verdict(figures)


def mean_sd(xs):
    xs = [x for x in xs if x is not None]
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else (float("nan"), 0.0)


def parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def main(argv=None) -> int:
    from mlx_lm.tuner.utils import load_adapters

    from conch_dna.log_setup import configure_logging
    from conch_dna.models import load_model
    from conch_dna.training.kd import KDConfig, TrueKnowledgeDistiller, load_domains
    from conch_dna.training.kd.domains import load_held_out, load_prompts
    from conch_dna.training.kd.evaluate import (
        answer,
        answer_figures,
        generation_metrics,
    )

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", nargs="*", default=["thinking"], help="none: only the costs")
    ap.add_argument("--speed-repeats", type=int, default=1, help="measure tokens/s this many times, the teacher and "
                    "students alternated (the median, and every figure in the JSON)")
    ap.add_argument("--students", nargs="+", default=["default-student"])
    ap.add_argument("--methods", nargs="+", default=["untrained", "sft", "kd"])
    ap.add_argument("--set", nargs="+", action="append", default=[], metavar="NAME KEY=VALUE",
                    help="define a method: its name, then KDConfig overrides")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--max-new-tokens", type=int, default=96, help="teacher answers to train on")
    ap.add_argument("--max-seq-length", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=64, help="answer length on held-out prompts")
    ap.add_argument("--teacher", default="default-teacher")
    ap.add_argument("--judge-dir", help="more held-out prompts: DIR/<domain>.txt, one per line (e.g. benchmarks/judge)")
    ap.add_argument("--work", default="models/benchmark_neurons")
    ap.add_argument("--out", help="write the markdown report here (and the figures as .json beside it)")
    args = ap.parse_args(argv)
    configure_logging(json_lines=True)
    methods = dict(METHODS)
    for spec in args.set:
        methods[spec[0]] = {k: parse_value(v) for k, v in (kv.split("=", 1) for kv in spec[1:])}
    unknown = [m for m in args.methods if m not in ("untrained", "start") and m not in methods]
    if unknown:
        ap.error(f"unknown methods {unknown}: known are untrained, start, {', '.join(methods)} (or define one with --set)")

    held_out = {domain: load_held_out(domain) for domain in args.domains}  # read and checked before any model loads
    if args.judge_dir and not Path(args.judge_dir).is_dir():
        ap.error(f"--judge-dir {args.judge_dir} is not a folder; give one holding <domain>.txt files (e.g. benchmarks/judge)")
    for domain, held in held_out.items():
        extra = Path(args.judge_dir or "", f"{domain}.txt")
        if args.judge_dir and extra.is_file():
            more = [p for p in load_prompts(extra) if p not in held]
            if leaked := set(more) & set(load_domains()[domain]):
                ap.error(f"{extra}: {sorted(leaked)[0]!r} is a training prompt of [{domain}]; judge only on unseen prompts")
            held += more

    teacher, tok = load_model(args.teacher)
    results: dict = {"cost": measure_costs(teacher, tok, args.teacher, args.students, args.speed_repeats), "domains": {}}
    for domain in args.domains:
        held = held_out[domain]
        t_answers = answer(teacher, tok, held, args.eval_tokens)
        rows = results["domains"].setdefault(domain, {"teacher": answer_figures(t_answers, tok) | {"prompts": len(held)}})
        for student in args.students:
            per = rows.setdefault(student, {})
            for method in args.methods:
                if method in ("untrained", "start"):
                    s, _ = load_model(student)
                    if method == "start":  # the adapter's residual start (lora.init), before any step
                        start_only(s, teacher, tok, domain, args)
                    g = generation_metrics(s, teacher, tok, held, teacher_answers=t_answers, max_new_tokens=args.eval_tokens)
                    per[method] = [{k: g[k] for k in SAVED} | {"answer": g["answers"][0], "repetitions": g["repetitions"]}]
                    print(json.dumps({"domain": domain, "student": student, "method": method, "gate": gate_verdict(g),
                                      **{k: round(g[k], 4) for k in SAVED}}), flush=True)
                    continue
                for seed in args.seeds:
                    cfg = KDConfig(**{"iters": args.iters, "max_seq_length": args.max_seq_length, "seed": seed,
                                      "val_interval": args.iters, "checkpoint_interval": args.iters,
                                      "output_dir": args.work, "student_model_id": student,
                                      "teacher_model_id": args.teacher, "eval_max_new_tokens": 0,
                                      "generation": {"max_new_tokens": args.max_new_tokens}, **methods[method]})
                    d = TrueKnowledgeDistiller(config=cfg, teacher=teacher, teacher_tokenizer=tok)
                    t0 = time.perf_counter()
                    r = d.distill_domain(f"{domain}-{Path(student).name}-{method}-s{seed}", load_domains()[domain], held_out=[])
                    s, _ = load_model(student)
                    load_adapters(s, r.adapter_path)
                    s.eval()
                    g = generation_metrics(s, teacher, tok, held, teacher_answers=t_answers, max_new_tokens=args.eval_tokens)
                    per.setdefault(method, []).append({k: g[k] for k in SAVED} | {
                        "answer": g["answers"][0], "repetitions": g["repetitions"], "val_kd": r.final_val_kd, "seconds": time.perf_counter() - t0,
                        "adapter_bytes": (Path(r.adapter_path) / "adapters.safetensors").stat().st_size})
                    print(json.dumps({"domain": domain, "student": student, "method": method, "seed": seed,
                                      "gate": gate_verdict(g), **{k: round(g[k], 4) for k in SAVED}}), flush=True)
                    if args.out:  # after every run: a long benchmark cut short keeps what it measured
                        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=2))
    results["args"] = vars(args)
    results["methods"] = {m: methods.get(m, {}) for m in args.methods}
    report = render(results, args)
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=2))
    return 0


def model_flops(folder: Path | None) -> int | None:
    """Forward FLOPs per token of a local model folder (None for a hub id): `flops_per_token` at no context."""
    from conch_dna.models import flops_per_token

    return flops_per_token(json.loads((folder / "config.json").read_text())) if folder else None


def start_only(student, teacher, tok, domain: str, args) -> dict:
    """Put `student` where training would start with lora.init = "residual": LoRA calibrated on the same
    teacher answers (seed 0's training split) as the trained methods, no step taken."""
    from conch_dna.training.kd import KDConfig, TrueKnowledgeDistiller, load_domains
    from conch_dna.training.kd.examples import split_examples
    from conch_dna.training.kd.lora_init import CALIBRATION_EXAMPLES, residual_start
    from conch_dna.training.kd.trainer import apply_lora

    cfg = KDConfig(max_seq_length=args.max_seq_length, seed=0, output_dir=args.work, teacher_model_id=args.teacher,
                   generation={"max_new_tokens": args.max_new_tokens})
    cache, _ = TrueKnowledgeDistiller(config=cfg, teacher=teacher, teacher_tokenizer=tok).generate_training_data(
        load_domains()[domain], domain)
    train, _ = split_examples(cache.examples, cfg.val_fraction, cfg.seed)
    apply_lora(student, cfg)
    return residual_start(student, teacher, train[:CALIBRATION_EXAMPLES], strict=True)


SPEED_PROMPT = "Explain in a few sentences why the sky is blue."


def measure_costs(teacher, tok, teacher_id: str, students: list[str], repeats: int) -> dict:
    """Weight bytes, FLOPs per token and single-stream tokens/s of the teacher and each student. Tokens/s is
    measured `repeats` times with the models alternated, so that a busy spell of the machine slows them alike:
    the median, and every figure as `tokens_per_second_all`."""
    from conch_dna.models import bf16_bytes, load_model, model_path
    from conch_dna.models.defaults import weight_bytes
    from conch_dna.training.kd.evaluate import generation_speed

    models = {"teacher": teacher, **{s: load_model(s)[0] for s in students}}
    cost = {"teacher": {"weight_bytes_bf16": bf16_bytes(teacher), "flops_per_token": model_flops(model_path(teacher_id))}}
    for s in students:
        folder = model_path(s)
        cost[s] = {"weight_bytes": weight_bytes(folder) if folder else None, "flops_per_token": model_flops(folder)}
    speeds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(max(1, repeats)):
        for name, model in models.items():
            speeds[name].append(generation_speed(model, tok, SPEED_PROMPT))
    for name, xs in speeds.items():
        cost[name] |= {"tokens_per_second": statistics.median(xs), "tokens_per_second_all": xs}
    return cost


def speed(cost: dict) -> str:
    """Tokens/s: the median, with the range when measured more than once."""
    xs = cost.get("tokens_per_second_all") or [cost["tokens_per_second"]]
    return f"{cost['tokens_per_second']:.1f}" + (f" ({min(xs):.1f}-{max(xs):.1f})" if len(xs) > 1 else "")


def render(results: dict, args) -> str:
    cmd = "python benchmarks/benchmark_neurons.py " + " ".join(sys.argv[1:])
    lines = [f"Command: `{cmd}`", "",
             f"Seeds {args.seeds}; {args.iters} steps; held-out answers of {args.eval_tokens} tokens (greedy, chat "
             "template). Mean ± standard deviation over seeds; one run shows its 90% interval over prompts.", ""]
    cost = results["cost"]
    t_bytes, t_flops = cost["teacher"]["weight_bytes_bf16"], cost["teacher"]["flops_per_token"]
    lines += ["| model | weight MB | of the teacher's bf16 bytes | MFLOPs per token | of the teacher's | tokens/s (1 stream) |",
              "|---|---|---|---|---|---|",
              f"| teacher (bf16) | {t_bytes / 1e6:.1f} | 100% | {t_flops / 1e6:.0f} | 100% | {speed(cost['teacher'])} |"]
    for name, c in cost.items():
        if name != "teacher" and c["weight_bytes"]:
            lines.append(f"| {name} | {c['weight_bytes'] / 1e6:.1f} | {c['weight_bytes'] / t_bytes:.1%} | "
                         f"{c['flops_per_token'] / 1e6:.0f} | {c['flops_per_token'] / t_flops:.0%} | {speed(c)} |")
    lines.append("")
    for domain, rows in results["domains"].items():
        t = rows["teacher"]
        lines += [f"### {domain}", "", f"{t.get('prompts', '?')} held-out prompts. Teacher's own answers: repeated 4-grams {t['repetition']:.3f}, "
                  f"end with EOS {t['eos_rate']:.2f}.", "",
                  "| student | method | KL(teacher‖neuron) | top-1 agreement | repeated 4-grams | over the teacher's | "
                  "teacher NLL of its answers | ends with EOS | KL gap closed | gate |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for student, per in rows.items():
            if student == "teacher":
                continue
            base = per.get("untrained", [{}])[0].get("kl")
            for method, runs in per.items():
                cols = [cell(runs, key) for key in ("kl", "agreement", "repetition", "repetition_excess", "teacher_nll", "eos_rate")]
                kl = mean_sd([r["kl"] for r in runs])[0]
                gap = f"{(base - kl) / base:.0%}" if base and method != "untrained" else ""
                gates = ", ".join(gate_verdict(r) for r in runs) if all("repetition_excess_high" in r for r in runs) else ""
                lines.append(f"| {student} | {method} | " + " | ".join(cols) + f" | {gap} | {gates} |")
        lines.append("")
    return "\n".join(lines)


def cell(runs: list[dict], key: str) -> str:
    """A figure over seeds (mean ± sd), or one run's figure with its interval where it has one."""
    if len(runs) > 1:
        mu, sd = mean_sd([r.get(key) for r in runs])
        return f"{mu:.3f} ± {sd:.3f}"
    r, sign = runs[0], "+" if key == "repetition_excess" else ""
    if f"{key}_low" in r:
        return f"{r[key]:{sign}.3f} [{r[f'{key}_low']:{sign}.3f}, {r[f'{key}_high']:{sign}.3f}]"
    return f"{r[key]:{sign}.3f}" if key in r else ""

if __name__ == "__main__":
    sys.exit(main())
