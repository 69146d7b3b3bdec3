#!/usr/bin/env python
"""What a long corpus-KD run makes of a student: held-out quality against training tokens, as a curve.

    python benchmarks/corpus_kd_curve.py --student smollm2-135m-instruct-pruned16 \\
        --text /usr/share/doc/python3.11/html/_sources --tokens 20000000 --points 8 --out corpus_kd

The teacher scores the corpus (dense targets, no generation: `KDConfig.text`, `text_share = 1`). With
`--prompts FILE` the teacher also answers those prompts (sampled, as for a domain) and its answers make up
`1 - --text-share` of the sequences: chat-shaped data beside the corpus (benchmarks/heal/chat.txt: the first
lines of chatterbot-corpus's English conversations and the questions of Python's FAQ, none a domain prompt).
`--prompts` takes files and domain names (a domain's training prompts; `all`: every domain's), `--answers N`
has the teacher answer each prompt N times (sampled: N different answers), `--on-policy L` has the student
write that share of the answers as it trains (the teacher scores them; corpus windows stay as they are).
`--max-seconds` stops the run cleanly at a checkpoint; `--resume` continues it (same settings) in a later
run, so a long healing spans several machine sessions; the curve covers every checkpoint kept. A healing can
also go on in stages that carry only the adapter: fuse it (`python -m conch_dna.models --fuse`), heal the fused
student in a new run, and `--join` the runs' results into one curve. The run
checkpoints `--points` times, and each checkpoint is judged on the held-out prompts of `--domain`
(`evaluate.generation_metrics`: KL and agreement on the teacher's greedy answers, repetition and teacher NLL of
its own) and on held-out corpus windows (validation KD at T = 1 and agreement). `--judge-domains` judges the last
checkpoint on those domains' held-out prompts too, with the registry gate's verdict. Writes <out>.json and,
with matplotlib, <out>.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import conch_dna  # noqa: E402,F401


def main(argv=None) -> int:
    from mlx_lm.tuner.utils import load_adapters

    from conch_dna.log_setup import configure_logging
    from conch_dna.models import load_model
    from conch_dna.training.kd import KDConfig, TrueKnowledgeDistiller
    from conch_dna.training.kd.checkpoints import checkpoint_dirs
    from conch_dna.training.kd.domains import gather_prompts, load_domains, load_held_out
    from conch_dna.training.kd.evaluate import answer, generation_metrics
    from conch_dna.training.kd.trainer import TrainingCancelled

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="default-teacher")
    ap.add_argument("--student", default="smollm2-135m-instruct-pruned16")
    ap.add_argument("--text", help="text file or folder (the corpus)")
    ap.add_argument("--tokens", type=int, default=20_000_000, help="training tokens in all")
    ap.add_argument("--points", type=int, default=8, help="checkpoints judged along the way")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-seq-length", type=int, default=512)
    ap.add_argument("--learning-rate", type=float, default=5e-4)
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--prompts", nargs="+", default=[], help="prompt files or domain names (their training prompts; "
                    "all: every domain's) the teacher answers; its answers are 1 - text-share of the sequences")
    ap.add_argument("--answers", type=int, default=1, help="answers the teacher writes to each prompt (sampled)")
    ap.add_argument("--on-policy", type=float, default=0.0, help="share of the answers the student writes as it trains")
    ap.add_argument("--unlikelihood", type=float, help="weight of the unlikelihood term (default: KDConfig's)")
    ap.add_argument("--generation-batch", type=int, default=128, help="prompts the teacher answers at once")
    ap.add_argument("--judge-domains", nargs="*", default=[], help="also judge the last checkpoint on these "
                    "domains' held-out prompts (all: every domain)")
    ap.add_argument("--text-share", type=float, default=1.0, help="share of corpus windows among the sequences")
    ap.add_argument("--max-seconds", type=float, help="stop at a checkpoint after this long (continue with --resume)")
    ap.add_argument("--resume", action="store_true", help="continue the run saved in --work")
    ap.add_argument("--domain", default="thinking", help="whose held-out prompts judge each checkpoint")
    ap.add_argument("--eval-tokens", type=int, default=64)
    ap.add_argument("--work", default="models/corpus_kd")
    ap.add_argument("--out", default="corpus_kd")
    ap.add_argument("--join", nargs="+", metavar="RESULT", help="no training: join these runs' <out>.json in order "
                    "(each run's student the one before it, healed and fused) into one curve, <out>.json and .png")
    args = ap.parse_args(argv)
    if args.join:
        runs = [json.loads(Path(f).read_text()) for f in args.join]
        judged = {(r["args"]["domain"], r["args"]["eval_tokens"]) for r in runs}
        if len(judged) > 1 or not all(r["curve"] for r in runs):
            ap.error(f"--join needs runs judged alike (the same --domain and --eval-tokens), each with a curve; got {sorted(judged)}")
        result = join_runs(runs)
        Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=2))
        plot(result, Path(args.out).with_suffix(".png"))
        return 0
    if not args.text:
        ap.error("--text (the corpus) is needed to train; --join only joins finished runs")
    configure_logging(json_lines=True)
    iters = max(args.points, args.tokens // (args.batch_size * args.max_seq_length))
    every = max(1, iters // args.points)
    domains = load_domains()
    prompts = gather_prompts(args.prompts, domains) * args.answers
    judge_domains = list(domains) if args.judge_domains == ["all"] else args.judge_domains
    extra = {"unlikelihood": args.unlikelihood} if args.unlikelihood is not None else {}
    cfg = KDConfig(teacher_model_id=args.teacher, student_model_id=args.student, text=args.text, text_share=args.text_share,
                   text_val_windows=32, iters=iters, batch_size=args.batch_size, max_seq_length=args.max_seq_length,
                   learning_rate=args.learning_rate, temperature=args.temperature, alpha=args.alpha,
                   warmup_steps=min(100, iters // 10), val_interval=every, checkpoint_interval=every,
                   keep_checkpoints=args.points + 1, output_dir=args.work, eval_max_new_tokens=0,
                   on_policy_lambda=args.on_policy, lora={"rank": args.lora_rank},
                   generation={"batch_size": args.generation_batch}, **extra)
    teacher, tok = load_model(args.teacher)
    d = TrueKnowledgeDistiller(config=cfg, teacher=teacher, teacher_tokenizer=tok)
    t0 = time.perf_counter()
    stop = (lambda: time.perf_counter() - t0 > args.max_seconds) if args.max_seconds is not None else None
    try:
        r = d.distill_domain("corpus", prompts, held_out=[], resume=args.resume, should_stop=stop)
        speed = r.tokens_processed / r.training_seconds
    except TrainingCancelled as e:
        print(f"stopped: {e}", flush=True)
        speed = None
    train_seconds = time.perf_counter() - t0
    out_dir = Path(cfg.output_dir) / "corpus"
    metrics = out_dir / "metrics.jsonl"  # absent when stopped before training began
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    val = {row["step"]: row for row in rows if row["type"] == "val"}
    trained = tokens_by_step(rows)
    held = load_held_out(args.domain)
    t_answers = answer(teacher, tok, held, args.eval_tokens)
    curve = []
    student, _ = load_model(args.student)
    g = generation_metrics(student, teacher, tok, held, teacher_answers=t_answers, max_new_tokens=args.eval_tokens)
    curve.append({"step": 0, "tokens": 0, **{k: v for k, v in g.items() if k != "answers"}, "answer": g["answers"][0],
                  "val_kd": val.get(0, {}).get("val_kd"), "val_agreement": val.get(0, {}).get("val_agreement")})
    checkpoints = checkpoint_dirs(out_dir)
    for ckpt in checkpoints:
        step = json.loads((ckpt / "state.json").read_text())["step"]
        student, _ = load_model(args.student)
        load_adapters(student, str(ckpt))
        student.eval()
        g = generation_metrics(student, teacher, tok, held, teacher_answers=t_answers, max_new_tokens=args.eval_tokens)
        curve.append({"step": step, "tokens": trained.get(step),
                      **{k: v for k, v in g.items() if k != "answers"}, "answer": g["answers"][0],
                      "val_kd": val.get(step, {}).get("val_kd"), "val_agreement": val.get(step, {}).get("val_agreement")})
        print(json.dumps({k: v for k, v in curve[-1].items() if k != "answer"}), flush=True)
    from conch_dna.training.kd.evaluate import answer_figures

    teacher_rep = answer_figures(t_answers, tok)["repetition"]
    # the last checkpoint's student, still loaded
    judged = judge_domains_at(student, teacher, tok, judge_domains, args.eval_tokens) if checkpoints and judge_domains else {}
    result = {"args": vars(args), "iters": iters, "train_seconds": train_seconds, "tokens_per_second": speed,
              "teacher_repetition": teacher_rep, "curve": curve, "domains": judged}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, Path(args.out).with_suffix(".png"))
    return 0


def join_runs(runs: list[dict]) -> dict:
    """Runs that healed in stages as one curve: each run's student is the one before it with its adapter fused,
    so its step 0 judges the model the previous run's last point judged (kept once: the previous run's), and
    its tokens count on from there. The last run's domains and teacher figures stand for the whole."""
    curve = list(runs[0]["curve"])
    for run in runs[1:]:
        offset = curve[-1]["tokens"] or 0
        curve += [{**p, "tokens": (p["tokens"] or 0) + offset} for p in run["curve"][1:]]
    return {**runs[-1], "curve": curve, "runs": [r["args"] for r in runs],
            "train_seconds": sum(r["train_seconds"] for r in runs)}


def judge_domains_at(student, teacher, tok, domains: list[str], eval_tokens: int) -> dict:
    """The student judged on each domain's held-out prompts, with the registry gate's verdict."""
    from conch_dna.cortex.registry import held_out_verdict
    from conch_dna.training.kd.domains import load_held_out
    from conch_dna.training.kd.evaluate import answer, answer_figures, generation_metrics

    out = {}
    for domain in domains:
        held = load_held_out(domain)
        t_answers = answer(teacher, tok, held, eval_tokens)
        g = generation_metrics(student, teacher, tok, held, teacher_answers=t_answers, max_new_tokens=eval_tokens)
        figures = {k: v for k, v in g.items() if isinstance(v, float)}
        out[domain] = {**figures, "teacher_repetition": answer_figures(t_answers, tok)["repetition"],
                       "gate": held_out_verdict(figures), "answer": g["answers"][0]}
        print(json.dumps({"domain": domain, **{k: v for k, v in out[domain].items() if k != "answer"}}), flush=True)
    return out


def tokens_by_step(rows: list[dict]) -> dict[int, int]:
    """Training tokens seen up to each step, from metrics.jsonl's step rows (a resumed run counts from zero
    again: its counts continue the earlier run's)."""
    seen, last, out = 0, 0, {}
    for row in (r for r in rows if r["type"] == "train"):
        seen += row["tokens"] - last if row["tokens"] >= last else row["tokens"]
        last, out[row["step"]] = row["tokens"], seen
    return out


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    c = result["curve"]
    x = [p["tokens"] / 1e6 for p in c]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(x, [p["kl"] for p in c], marker="o", label="held-out prompts")
    axes[0].plot(x, [p["val_kd"] for p in c], marker="s", label="held-out corpus windows (val KD)")
    axes[0].set_title("KL(teacher‖student)")
    axes[1].plot(x, [p["agreement"] for p in c], marker="o", label="held-out prompts")
    axes[1].plot(x, [p["val_agreement"] for p in c], marker="s", label="held-out corpus windows")
    axes[1].set_title("top-1 agreement")
    axes[2].plot(x, [p["repetition"] for p in c], marker="o", label="student")
    axes[2].axhline(result["teacher_repetition"], color="#c44e52", linestyle="--", label="teacher")
    axes[2].set_title("repeated 4-grams in its own answers")
    for ax in axes:
        ax.set_xlabel("training tokens (millions)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
