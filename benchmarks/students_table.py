#!/usr/bin/env python
"""One table per domain of neurons measured in separate runs: each row's held-out figures with their intervals
and the quality gate's verdict, read from the runs' raw results (docs/runs/).

    python benchmarks/students_table.py "4-bit, main job=docs/runs/all-domains-cpu.json" \\
        "3-bit, 200 steps=docs/runs/q3-six-domains-200-steps-h100.json#smollm2-135m-instruct-q3/kd200@thinking,memory"

A row is `LABEL=FILE[#STUDENT/METHOD][@DOMAIN,...]`: FILE is `benchmark_neurons.py`'s JSON (STUDENT/METHOD picks
the neuron; the first seed's run) or `distill_neurons.py --all`'s (its `held_out` figures); `@` keeps those
domains only. Domains are listed in the order the rows first name them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import conch_dna  # noqa: E402,F401


def parse_row(spec: str) -> tuple[str, Path, str | None, str | None, list[str] | None]:
    """(label, file, student, method, domains) of `LABEL=FILE[#STUDENT/METHOD][@DOMAIN,...]`."""
    label, sep, rest = spec.partition("=")
    if not sep or not label or not rest:
        raise ValueError(f"a row is LABEL=FILE[#STUDENT/METHOD][@DOMAIN,...], got {spec!r}")
    rest, _, domains = rest.partition("@")
    path, _, pick = rest.partition("#")
    student, _, method = pick.rpartition("/") if pick else (None, None, None)
    if pick and not (student and method):
        raise ValueError(f"{spec!r}: pick a neuron as #STUDENT/METHOD")
    return label, Path(path), student, method, domains.split(",") if domains else None


def figures_by_domain(data: dict, student: str | None, method: str | None) -> dict[str, dict]:
    """Held-out figures per domain, with the teacher's repetition as `teacher_repetition`."""
    domains = data["domains"]
    if isinstance(domains, list):  # distill_neurons.py --all
        return {d["domain"]: d["held_out"] for d in domains if d.get("held_out")}
    out = {}
    for domain, rows in domains.items():
        runs = rows.get(student, {}).get(method) if student else None
        if runs:
            out[domain] = {**runs[0], "teacher_repetition": rows["teacher"]["repetition"]}
    return out


def interval(f: dict, key: str, signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    low, high = f.get(f"{key}_low"), f.get(f"{key}_high")
    body = fmt.format(f[key])
    return body + (f" [{fmt.format(low)}, {fmt.format(high)}]" if low is not None and high is not None else "")


def table(rows: list[tuple[str, dict[str, dict]]]) -> str:
    from conch_dna.cortex.registry import held_out_verdict

    domains = list(dict.fromkeys(d for _, by_domain in rows for d in by_domain))
    lines = ["| domain | neuron | KL(teacher‖neuron) | top-1 agreement | repeated 4-grams (teacher's) | over the teacher's | gate |",
             "|---|---|---|---|---|---|---|"]
    for domain in domains:
        for label, by_domain in rows:
            f = by_domain.get(domain)
            if f is None:
                continue
            gate = held_out_verdict(f)
            lines.append(f"| {domain} | {label} | {interval(f, 'kl')} | {interval(f, 'agreement')} | "
                         f"{f['repetition']:.3f} ({f['teacher_repetition']:.3f}) | {interval(f, 'repetition_excess', True)} | {gate} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", nargs="+", help="LABEL=FILE[#STUDENT/METHOD][@DOMAIN,...]")
    args = ap.parse_args(argv)
    rows = []
    try:
        for spec in args.rows:
            label, path, student, method, keep = parse_row(spec)
            by_domain = figures_by_domain(json.loads(path.read_text()), student, method)
            if keep:
                by_domain = {d: by_domain[d] for d in keep if d in by_domain}
            if not by_domain:
                raise ValueError(f"{spec!r}: no held-out figures for that neuron in {path}")
            rows.append((label, by_domain))
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
