#!/usr/bin/env python
"""Cross-tokenizer KD vs SFT, on a real pair with different vocabularies.

    python benchmarks/benchmark_cross_tokenizer.py --seeds 0 1 --iters 20 --out /tmp/cross_tokenizer.md

Teacher SmolLM2-135M-Instruct (49k byte-level BPE) answers the domains' prompts; the student Gemma-3-270m
(262k SentencePiece, a base model) is trained as LoRA on the same teacher answers, with the same budget:
  sft    alpha = 0: cross-entropy on the teacher's text, re-tokenized for the student
  kd     alpha = 0.7, T = 2: + KD at aligned positions (exact vocabulary mapping + ULD on the rest)
  kd_t1  alpha = 0.7, T = 1 (the teacher's own distribution, which its text is sampled from)
The last prompts of every domain are held out. On their teacher answers we measure the student's loss against
the teacher's text (cross-entropy per student token, and per character so that it does not depend on the
tokenizer), KL(teacher || student) at aligned positions at T = 1 (on the mapped tokens + remainder bucket),
top-1 agreement, and the coverage figures (teacher mass on mapped tokens; share of positions aligned).
`--reverse` swaps the roles (Gemma teaches SmolLM2; Gemma is a base model, so its answers are continuations).
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

METHODS = {"sft": dict(alpha=0.0), "kd": dict(alpha=0.7, temperature=2.0), "kd_t1": dict(alpha=0.7, temperature=1.0)}


def measure(distiller, student, s_tok, held_cache, batch_size: int) -> dict:
    """Held-out figures of `student` against the teacher's answers (T = 1, both loss parts reported)."""
    from conch_dna.training.kd.cross_vocab import compare_tokenizers
    from conch_dna.training.kd.targets import cross_targets
    from conch_dna.training.kd.validation import evaluate

    examples, cross = distiller._cross_setup(held_cache, student, s_tok, compare_tokenizers(distiller.teacher_tokenizer, s_tok))
    fn = cross_targets(distiller.teacher, distiller.config, [], examples, cross["vmap"])
    cfg = distiller.config.model_copy(update={"temperature": 1.0, "alpha": 0.5, "uld_weight": 0.0})
    v = evaluate(student, examples, fn, cfg, batch_size)
    chars = sum(len(s_tok.decode(list(e.tokens[e.prompt_len:]))) for e in examples)
    return {"ce_per_token": v["val_ce"], "ce_per_char": v["val_ce"] * v["val_tokens"] / max(chars, 1),
            "kl_aligned": v["val_kd"], "agreement": v["val_agreement"], "coverage": v["val_coverage"],
            "positions_aligned": cross["figures"]["positions_aligned"], "tokens": v["val_tokens"]}


def main(argv=None) -> int:
    from conch_dna.log_setup import configure_logging
    from conch_dna.models import load_model
    from conch_dna.training.kd import KDConfig, TrueKnowledgeDistiller, load_domains
    from conch_dna.training.kd.trainer import apply_lora

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", nargs="+", help="default: all of config/domains.toml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--learning-rate", type=float, default=2e-4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-seq-length", type=int, default=160)
    ap.add_argument("--heldout", type=int, default=2, help="prompts held out per domain (its last ones)")
    ap.add_argument("--reverse", action="store_true", help="Gemma-3-270m teaches SmolLM2-135M-Instruct")
    ap.add_argument("--work", default="models/benchmark_cross_tokenizer")
    ap.add_argument("--out", help="write the markdown report here (and the figures as .json)")
    ap.add_argument("--heldout-temperature", type=float, action="append",
                    help="sampling temperature of the held-out teacher answers (repeatable; default: the generation "
                         "default, 0.7, as for the training data; 1.0 samples the teacher's own distribution)")
    ap.add_argument("--eval-only", action="store_true", help="measure the adapters already trained in --work")
    args = ap.parse_args(argv)
    configure_logging(json_lines=True)
    teacher_id, student_id = ("gemma-3-270m", "default-teacher") if args.reverse else ("default-teacher", "gemma-3-270m")

    teacher, t_tok = load_model(teacher_id)
    domains = load_domains()
    args.domains = args.domains or list(domains)
    held = [p for d in args.domains for p in domains[d][-args.heldout:]]
    train_prompts = [p for d in args.domains for p in domains[d][: -args.heldout]]
    base = dict(teacher_model_id=teacher_id, student_model_id=student_id, iters=args.iters, batch_size=args.batch_size,
                learning_rate=args.learning_rate, val_fraction=0.1, val_interval=max(1, args.iters // 5),
                checkpoint_interval=args.iters, max_seq_length=args.max_seq_length, output_dir=args.work,
                generation={"max_new_tokens": args.max_new_tokens})
    d0 = TrueKnowledgeDistiller(config=KDConfig(**base), teacher=teacher, teacher_tokenizer=t_tok)
    held_sets = {}
    for temp in args.heldout_temperature or [KDConfig().generation.temperature]:
        d = TrueKnowledgeDistiller(config=KDConfig(**{**base, "generation": {**base["generation"], "temperature": temp}}),
                                   teacher=teacher, teacher_tokenizer=t_tok)
        held_sets[temp] = d.generate_training_data(held, "heldout")[0]

    def measure_all(student, s_tok) -> dict:
        out = {}
        for temp, cache in held_sets.items():
            m = measure(d0, student, s_tok, cache, args.batch_size)
            out.update(m if len(held_sets) == 1 else {f"{k}@{temp}": v for k, v in m.items()})
        return out

    rows: dict[str, list[dict]] = {}
    student, s_tok = load_model(student_id)
    rows["untrained"] = [measure_all(student, s_tok)]
    figures = None
    for method in args.methods:
        over = METHODS[method]
        for seed in args.seeds:
            cfg = KDConfig(**{**base, **over, "seed": seed})
            d = TrueKnowledgeDistiller(config=cfg, teacher=teacher, teacher_tokenizer=t_tok)
            t0 = time.perf_counter()
            if args.eval_only:
                adapter = Path(args.work) / f"{method}-s{seed}"
                figures = json.loads((adapter / "result.json").read_text())["cross_tokenizer"]
            else:
                r = d.distill_domain(f"{method}-s{seed}", train_prompts)
                adapter, figures = Path(r.adapter_path), r.cross_tokenizer
            student, s_tok = load_model(student_id)
            apply_lora(student, cfg)
            student.load_weights(str(adapter / "adapters.safetensors"), strict=False)
            student.eval()
            m = measure_all(student, s_tok)
            m["seconds"] = time.perf_counter() - t0
            rows.setdefault(method, []).append(m)
            print(json.dumps({"method": method, "seed": seed, **m}), flush=True)
    report = render(rows, figures, args, teacher_id, student_id)
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
        Path(args.out).with_suffix(".json").write_text(json.dumps({"rows": rows, "coverage": figures, "args": vars(args)}, indent=2))
    return 0


def render(rows: dict, figures: dict | None, args, teacher_id: str, student_id: str) -> str:
    def cell(method, key, fmt="{:.3f}"):
        xs = [r[key] for r in rows[method]]
        if len(xs) == 1:
            return fmt.format(xs[0])
        return f"{fmt.format(statistics.fmean(xs))} ± {fmt.format(statistics.stdev(xs))}"

    base_keys = [("ce_per_token", "held-out CE / student token"), ("ce_per_char", "CE / character"),
                 ("kl_aligned", "KL at aligned positions (T=1)"), ("agreement", "top-1 agreement"),
                 ("coverage", "teacher mass on mapped tokens")]
    temps = sorted({k.split("@")[1] for k in rows["untrained"][0] if "@" in k})
    keys = base_keys if not temps else [(f"{k}@{t}", f"{label} (answers sampled at T={t})")
                                        for t in temps for k, label in base_keys if k != "coverage"]
    lines = [f"Teacher `{teacher_id}` -> student `{student_id}`, domains {', '.join(args.domains)}: "
             f"{args.heldout} held-out prompts each, the rest for training; {args.iters} steps, batch {args.batch_size}, "
             f"lr {args.learning_rate}, LoRA defaults, seeds {args.seeds}.",
             "", "| method | " + " | ".join(k[1] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for method in rows:
        lines.append(f"| {method} | " + " | ".join(cell(method, k) for k, _ in keys) + " |")
    if figures:
        lines += ["", "Coverage (training data): " + ", ".join(
            f"{k} {figures[k]}" for k in ("teacher_vocab", "student_vocab", "mapped_tokens", "teacher_vocab_mapped",
                                          "student_vocab_mapped", "positions_aligned") if k in figures)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
