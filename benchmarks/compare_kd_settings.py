#!/usr/bin/env python
"""A temperature x alpha comparison table for one domain.

    python benchmarks/compare_kd_settings.py --domain thinking --temperatures 1 2 4 --alphas 0 0.5 0.7 1 --iters 30

Every cell trains a fresh LoRA adapter with the same teacher data (generated once, then read from the
cache), the same seed and budget, and reports the held-out validation KD at T=1 (the same yardstick for every
cell, whatever T it trained with), validation CE and teacher-student top-1 agreement. Markdown on stdout.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import conch_dna  # noqa: E402,F401


def main(argv=None) -> int:
    from conch_dna.log_setup import configure_logging
    from conch_dna.training.kd import KDConfig, TrueKnowledgeDistiller, load_domains, load_prompts
    from conch_dna.training.kd.validation import evaluate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domain", default="thinking")
    ap.add_argument("--prompts")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 0.7, 1.0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--teacher", default="default-teacher")
    ap.add_argument("--student", default="default-student")
    ap.add_argument("--output", default="models/kd_sweep")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-seq-length", type=int, default=256)
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    configure_logging(json_lines=True)
    prompts = load_prompts(args.prompts) if args.prompts else load_domains()[args.domain]
    rows = []
    for T in args.temperatures:
        for alpha in args.alphas:
            cfg = KDConfig(teacher_model_id=args.teacher, student_model_id=args.student, temperature=T, alpha=alpha,
                           iters=args.iters, val_interval=args.iters, checkpoint_interval=args.iters,
                           max_seq_length=args.max_seq_length, output_dir=args.output,
                           generation={"max_new_tokens": args.max_new_tokens})
            d = TrueKnowledgeDistiller(config=cfg)
            # One output folder for the sweep: every cell reads the same teacher cache (keyed by the prompts).
            r = d.distill_domain(f"{args.domain}-T{T:g}-a{alpha:g}", prompts)
            # Re-evaluate every cell at T=1, alpha=0.5 so the columns compare like with like.
            from conch_dna.models import load_model
            from conch_dna.training.kd.examples import split_examples
            from conch_dna.training.kd.targets import teacher_targets
            from conch_dna.training.kd.teacher_cache import TeacherCache
            from conch_dna.training.kd.trainer import apply_lora

            cache = TeacherCache.load(Path(cfg.output_dir) / "teacher_cache" / r.generation.get("cache_key", ""))
            _, val_idx = split_examples(list(range(len(cache.examples))), cfg.val_fraction, cfg.seed)
            student, _ = load_model(cfg.student_model_id)
            apply_lora(student, cfg)
            student.load_weights(str(Path(r.adapter_path) / "adapters.safetensors"), strict=False)
            val = [cache.examples[i] for i in val_idx]
            targets = teacher_targets(d.teacher, cfg, (cache, [], val_idx))
            yard = cfg.model_copy(update={"temperature": 1.0, "alpha": 0.5})
            m = evaluate(student, val, targets, yard, cfg.batch_size)
            rows.append({"temperature": T, "alpha": alpha, "val_kd_T1": m["val_kd"], "val_ce": m["val_ce"],
                         "val_agreement": m["val_agreement"], "initial_val_kd_T": r.initial_val_kd,
                         "train_seconds": r.training_seconds})
    print(f"\n### {args.domain}: {args.iters} steps each; held-out validation (KD measured at T=1)\n")
    print("| T | alpha | val KD (T=1) | val CE | top-1 agreement |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['temperature']:g} | {row['alpha']:g} | {row['val_kd_T1']:.4f} | {row['val_ce']:.4f} | {row['val_agreement']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
