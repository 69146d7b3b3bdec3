#!/usr/bin/env python
"""How a neuron answers: the teacher, the untrained student and each neuron on the domain's held-out prompts.

    python scripts/evaluate_neuron.py --domain thinking                       # every version in the registry
    python scripts/evaluate_neuron.py --domain thinking --adapter models/distilled_neurons/adapters_kd/thinking

Figures (`evaluate.generation_metrics`, greedy, chat template): KL(teacher || model) and top-1 agreement on
the teacher's answers; repeated 4-grams (and their excess over the teacher's on the same prompts, what the
quality gate reads), the teacher's NLL and the share ending with EOS of its own answers, with 90% intervals;
weight bytes beside the teacher's in bf16. Then a few answers side by side.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import conch_dna  # noqa: E402,F401


def main(argv=None) -> int:
    from mlx_lm.tuner.utils import load_adapters

    from conch_dna.cortex import NeuronRegistry
    from conch_dna.log_setup import configure_logging
    from conch_dna.models import bf16_bytes, load_model, model_path
    from conch_dna.models.defaults import weight_bytes
    from conch_dna.training.kd.domains import load_held_out, load_prompts
    from conch_dna.training.kd.evaluate import answer, generation_metrics

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domain", default="thinking")
    ap.add_argument("--prompts", help="held-out prompts file (default: the domain's held_out list)")
    ap.add_argument("--teacher", default="default-teacher")
    ap.add_argument("--student", default="default-student")
    ap.add_argument("--adapter", action="append", default=[], help="an adapter folder (repeatable)")
    ap.add_argument("--registry", default="models/cortex_registry", help="used when no --adapter is given")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--answers", type=int, default=2, help="answers shown side by side")
    args = ap.parse_args(argv)
    configure_logging()
    prompts = load_prompts(args.prompts) if args.prompts else load_held_out(args.domain)
    if not prompts:
        print(f"error: domain {args.domain!r} has no held_out prompts; pass --prompts FILE", file=sys.stderr)
        return 2
    adapters = [(Path(a).name, Path(a)) for a in args.adapter]
    if not adapters and Path(args.registry).is_dir():
        registry = NeuronRegistry(args.registry)
        active = registry.active(args.domain)
        for v in registry.versions(args.domain):
            mark = " (active)" if active is not None and v.version == active.version else ""
            adapters.append((f"v{v.version}{mark}", registry.verify(v)))  # every file checked
    teacher, tok = load_model(args.teacher)
    t_answers = answer(teacher, tok, prompts, args.max_new_tokens)
    teacher_bf16 = bf16_bytes(teacher)
    base = model_path(args.student)
    base_bytes = weight_bytes(base) if base else None
    rows = [("teacher", teacher, teacher_bf16)]
    student, _ = load_model(args.student)
    rows.append(("untrained student", student, base_bytes))
    for name, folder in adapters:
        s, _ = load_model(args.student)
        load_adapters(s, str(folder))
        s.eval()
        size = base_bytes + (folder / "adapters.safetensors").stat().st_size if base_bytes else None
        rows.append((f"neuron {name}", s, size))
    print(f"{args.domain}: {len(prompts)} held-out prompts, greedy answers of {args.max_new_tokens} tokens; "
          "90% intervals over prompts in brackets\n")
    print("| model | KL(teacher‖model) | top-1 agreement | repeated 4-grams | over the teacher's | teacher NLL of its answers | ends with EOS | weight bytes (share of teacher bf16) |")
    print("|---|---|---|---|---|---|---|---|")
    answers = {}
    for name, model, size in rows:
        g = generation_metrics(model, teacher, tok, prompts, teacher_answers=t_answers, max_new_tokens=args.max_new_tokens)
        answers[name] = g["answers"]
        share = f"{size / 1e6:.1f} MB ({size / teacher_bf16:.0%})" if size else "?"
        shown = {k: f"{g[k]:.3f} [{g[k + '_low']:.3f}, {g[k + '_high']:.3f}]" for k in ("kl", "agreement", "repetition")}
        excess = f"{g['repetition_excess']:+.3f} [{g['repetition_excess_low']:+.3f}, {g['repetition_excess_high']:+.3f}]"
        print(f"| {name} | {shown['kl']} | {shown['agreement']} | {shown['repetition']} | {excess} | {g['teacher_nll']:.3f} | "
              f"{g['eos_rate']:.2f} | {share} |", flush=True)
    for i, prompt in enumerate(prompts[: args.answers]):
        print(f"\n### {prompt}")
        for name in answers:
            print(f"- **{name}**: {answers[name][i].strip()[:400]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
