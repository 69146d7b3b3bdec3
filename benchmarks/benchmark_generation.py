#!/usr/bin/env python
"""The teacher writing its answers (`examples.generate_examples`, what every distillation starts with): tokens/s
with the whole generation batch decoded together against mlx-lm's default of 32 at a time, alternated in one
process.

    python benchmarks/benchmark_generation.py --prompts all --answers 2 --batch-size 512 --repeats 2

`--prompts` takes domain names (their training prompts; `all`: every domain's) and prompt files, each answered
`--answers` times (sampled, as for training).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import conch_dna  # noqa: E402,F401


def main(argv=None) -> int:
    import mlx.core as mx

    from conch_dna.models import load_model
    from conch_dna.training.kd import KDConfig, examples
    from conch_dna.training.kd.domains import gather_prompts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="default-teacher")
    ap.add_argument("--prompts", nargs="+", default=["all"])
    ap.add_argument("--answers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    prompts = gather_prompts(args.prompts) * args.answers
    teacher, tok = load_model(args.teacher)
    cfg = KDConfig(generation={"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}, max_seq_length=512)
    together = examples.decode_together
    settings = {"mlx-lm default (32 at a time)": lambda n: {}, "whole batch together": together}
    speeds: dict[str, list[float]] = {name: [] for name in settings}
    examples.generate_examples(teacher, tok, prompts[: min(8, len(prompts))], cfg)  # warm-up
    try:
        for r in range(args.repeats):
            for name, setting in settings.items():
                examples.decode_together = setting  # what generate_examples asks mlx-lm for
                _, stats = examples.generate_examples(teacher, tok, prompts, cfg)
                speeds[name].append(stats["tokens_per_second"])
                print(f"repeat {r}: {name}: {stats['generated_tokens']} tokens in {stats['seconds']:.1f} s, "
                      f"{stats['tokens_per_second']:.0f} tokens/s", flush=True)
    finally:
        examples.decode_together = together
    print(f"\n{len(prompts)} answers, batch {args.batch_size}, up to {args.max_new_tokens} tokens each, "
          f"device {mx.default_device()}")
    for name, xs in speeds.items():
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        print(f"{name}: {statistics.fmean(xs):.0f} ± {sd:.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
