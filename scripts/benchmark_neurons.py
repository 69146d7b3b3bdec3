#!/usr/bin/env python
"""KD neurons vs non-KD neurons, on held-out prompts and real human text.

    python scripts/benchmark_neurons.py --domains thinking --seeds 0 1 --iters 30 \\
        --out docs/quality.md --img docs/img

Per domain the prompts are split once (fixed) into training prompts and held-out prompts the students never
see. Every method trains on the same teacher data with the same budget (steps, batch, LoRA size):
  untrained  the pruned student as is
  sft        alpha = 0: cross-entropy on the teacher's text only (sequence-level distillation)
  kd         alpha = 0.7, T = 2 (Hinton)
  pure_kd    alpha = 1, T = 2
  on_policy  alpha = 0.7, T = 2, half of each batch's responses written by the current student (GKD-style)
Metrics on the held-out prompts' teacher responses: per-token KL(teacher || student) at T = 1, top-1
agreement, the student's perplexity on the responses; and perplexity on real text (`--text`). "Gap closed" is
(untrained - method) / (untrained - teacher) for each metric.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import conch_dna  # noqa: E402,F401

METHODS = {
    "sft": dict(alpha=0.0),
    "kd": dict(alpha=0.7, temperature=2.0),
    "pure_kd": dict(alpha=1.0, temperature=2.0),
    "on_policy": dict(alpha=0.7, temperature=2.0, on_policy_lambda=0.5),
}
DEFAULT_TEXT = "/usr/share/doc/python3.11/html/_sources/tutorial/datastructures.rst.txt"


def mean_sd(xs):
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv=None) -> int:
    from conch_dna.log_setup import configure_logging
    from conch_dna.models import load_model
    from conch_dna.training.kd import KDConfig, TrueKnowledgeDistiller, load_domains
    from conch_dna.training.kd.evaluate import compare_to_teacher, text_perplexity
    from conch_dna.training.kd.trainer import apply_lora

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", nargs="+", default=["thinking"])
    ap.add_argument("--methods", nargs="+", default=["untrained", *METHODS], choices=["untrained", *METHODS])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--learning-rate", type=float, default=2e-4)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-seq-length", type=int, default=192)
    ap.add_argument("--heldout-fraction", type=float, default=0.25)
    ap.add_argument("--teacher", default="default-teacher")
    ap.add_argument("--student", default="default-student")
    ap.add_argument("--text", default=DEFAULT_TEXT, help="real human text for perplexity")
    ap.add_argument("--text-tokens", type=int, default=1024)
    ap.add_argument("--work", default="models/benchmark_neurons")
    ap.add_argument("--out", help="write the markdown report here")
    ap.add_argument("--img", help="write plots (PNG) here; needs matplotlib")
    args = ap.parse_args(argv)
    configure_logging(json_lines=True)
    if not Path(args.text).is_file():
        args.text = str(Path(json.__file__))  # any machine has real text: the stdlib's own source and docs

    teacher, t_tok = load_model(args.teacher)
    results: dict = {}
    curves: dict = {}
    for domain in args.domains:
        prompts = load_domains()[domain]
        n_held = max(1, round(len(prompts) * args.heldout_fraction))
        held, train_prompts = prompts[-n_held:], prompts[:-n_held]  # fixed split: the last prompts are held out
        base_cfg = dict(teacher_model_id=args.teacher, student_model_id=args.student, iters=args.iters,
                        batch_size=args.batch_size, learning_rate=args.learning_rate, val_fraction=0.1,
                        val_interval=max(1, args.iters // 5), checkpoint_interval=args.iters, max_seq_length=args.max_seq_length,
                        output_dir=args.work, lora={"rank": args.lora_rank},
                        generation={"max_new_tokens": args.max_new_tokens})
        d0 = TrueKnowledgeDistiller(config=KDConfig(**base_cfg), teacher=teacher, teacher_tokenizer=t_tok)
        held_cache, _ = d0.generate_training_data(held, domain + "-heldout")
        held_examples = held_cache.examples

        def measure(model, tok):
            m = compare_to_teacher(model, teacher, held_examples)
            m["text_ppl"] = text_perplexity(model, tok, args.text, max_tokens=args.text_tokens)["ppl"]
            return m

        rows = results.setdefault(domain, {})
        rows["teacher"] = [measure(teacher, t_tok)]
        if "untrained" in args.methods:
            s, s_tok = load_model(args.student)
            rows["untrained"] = [measure(s, s_tok)]
        for method in [m for m in args.methods if m != "untrained"]:
            for seed in args.seeds:
                cfg = KDConfig(**{**base_cfg, **METHODS[method], "seed": seed})
                d = TrueKnowledgeDistiller(config=cfg, teacher=teacher, teacher_tokenizer=t_tok)
                r = d.distill_domain(f"{domain}-{method}-s{seed}", train_prompts)
                s, s_tok = load_model(args.student)
                apply_lora(s, cfg)
                s.load_weights(str(Path(r.adapter_path) / "adapters.safetensors"), strict=False)
                s.eval()
                rows.setdefault(method, []).append(measure(s, s_tok))
                curve = [json.loads(x) for x in (Path(r.adapter_path) / "metrics.jsonl").read_text().splitlines()]
                curves.setdefault(domain, {}).setdefault(method, []).append(curve)
    report = render(results, args)
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
        Path(args.out).with_suffix(".json").write_text(json.dumps({"results": results, "args": vars(args)}, indent=2))
    if args.img:
        plot(results, curves, Path(args.img))
    return 0


def render(results: dict, args) -> str:
    cmd = "python scripts/benchmark_neurons.py " + " ".join(sys.argv[1:])
    lines = ["# Quality: KD neurons vs non-KD neurons", "", f"Command: `{cmd}`", "",
             f"Seeds {args.seeds}; {args.iters} steps x batch {args.batch_size}; LoRA rank {args.lora_rank} on attention + "
             f"MLP; teacher responses of up to {args.max_new_tokens} tokens; real text: `{args.text}` "
             f"({args.text_tokens} tokens). Mean +- standard deviation over seeds.", ""]
    for domain, rows in results.items():
        lines += [f"## {domain}", "",
                  "| method | KL(teacher‖student) held-out | top-1 agreement | response ppl | real-text ppl | gap closed (KL / agreement / text ppl) |",
                  "|---|---|---|---|---|---|"]
        teacher, untrained = rows["teacher"][0], rows.get("untrained", [None])[0]
        for method, ms in rows.items():
            cols = []
            for key in ("kl", "agreement", "response_ppl", "text_ppl"):
                mu, sd = mean_sd([m[key] for m in ms])
                cols.append(f"{mu:.4f} ± {sd:.4f}" if key in ("kl", "agreement") else f"{mu:.2f} ± {sd:.2f}")
            gap = ""
            if untrained is not None and method not in ("teacher", "untrained"):
                def closed(key, log=False):
                    f = (lambda x: math.log(x)) if log else (lambda x: x)
                    u, t, v = f(untrained[key]), f(teacher[key]), f(statistics.fmean(m[key] for m in ms))
                    return (u - v) / (u - t) if u != t else float("nan")
                gap = f"{closed('kl'):.0%} / {closed('agreement'):.0%} / {closed('text_ppl', log=True):.0%}"
            lines.append(f"| {method} | " + " | ".join(cols) + f" | {gap} |")
        lines.append("")
    lines += ["Gap closed for text perplexity is measured on log perplexity (cross-entropy).", ""]
    return "\n".join(lines)


def plot(results: dict, curves: dict, folder: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return
    folder.mkdir(parents=True, exist_ok=True)
    for domain, rows in results.items():
        methods = [m for m in rows if m != "teacher"]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for ax, key, title in zip(axes, ("kl", "agreement", "text_ppl"),
                                  ("held-out KL(teacher‖student)", "top-1 agreement", "real-text perplexity")):
            mus = [mean_sd([m[key] for m in rows[k]]) for k in methods]
            ax.bar(methods, [m for m, _ in mus], yerr=[s for _, s in mus], capsize=4, color="#4c72b0")
            if key != "kl":
                ax.axhline(rows["teacher"][0][key], color="#c44e52", linestyle="--", label="teacher")
                ax.legend()
            if key == "text_ppl":
                ax.set_yscale("log")
            ax.set_title(title)
            ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        fig.savefig(folder / f"quality_{domain}_metrics.png", dpi=110)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for method, runs in curves.get(domain, {}).items():
            for i, run in enumerate(runs):
                val = [(r["step"], r["val_kd"]) for r in run if r["type"] == "val"]
                ax.plot(*zip(*val), marker="o", label=f"{method} (seed run {i})")
        ax.set_xlabel("step")
        ax.set_ylabel("validation KD loss (the run's own T)")
        ax.set_title(f"{domain}: validation KD during training")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / f"quality_{domain}_curves.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
