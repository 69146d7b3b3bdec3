#!/usr/bin/env python
"""Data-parallel scaling on this machine: the same KD run (same global batch, seed, steps) on 1 process and
on N processes (mlx.launch, ring backend on localhost); training tokens/s from each run's result.json.

    python benchmarks/bench_data_parallel.py [--procs 2] [--iters 20]
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import conch_dna  # noqa: E402,F401
from conch_dna.models.tiny import build_tiny_model  # noqa: E402

LAUNCH = "import sys; from mlx._distributed_utils.launch import main; sys.argv[0] = 'mlx.launch'; sys.exit(main())"
PROMPTS = [f"Explain step {i} of making tea, and why it matters for the taste." for i in range(32)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dp-bench-"))
    teacher = build_tiny_model(work / "teacher", num_layers=8, hidden_size=512, intermediate_size=1408, num_heads=8, num_kv_heads=4)
    student = build_tiny_model(work / "student", num_layers=4, hidden_size=256, intermediate_size=704, num_heads=4,
                               num_kv_heads=2, seed=1, tokenizer_from=teacher)
    (work / "p.txt").write_text("\n".join(PROMPTS))
    (work / "kd.toml").write_text(f"batch_size = {args.batch}\niters = {args.iters}\nval_fraction = 0.0\n"
                                  f"checkpoint_interval = {args.iters}\nmax_seq_length = 128\n"
                                  "[generation]\nmax_new_tokens = 48\ntemperature = 0.0\nbatch_size = 16\n")
    cores = os.cpu_count() or 1
    rows = []
    for n in (1, args.procs):
        out = work / f"out{n}"
        cli = ["-m", "conch_dna.training.kd", "--domain", "dp", "--prompts", str(work / "p.txt"), "--teacher", str(teacher),
               "--student", str(student), "--output", str(out), "--config", str(work / "kd.toml"), "--no-register", "--log-json"]
        env = {**os.environ, "OPENBLAS_NUM_THREADS": str(max(1, cores // n))}  # share the cores fairly
        cmd = [sys.executable, *cli] if n == 1 else [sys.executable, "-c", LAUNCH, "--backend", "ring", "-n", str(n),
                                                    "--starting-port", str(random.randint(20000, 40000)), "--", sys.executable, *cli]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(run.stderr[-3000:])
        r = json.loads((out / "dp" / "result.json").read_text())
        rows.append((n, r["tokens_processed"] / r["training_seconds"], r["training_seconds"]))
    print(f"{cores} cores; global batch {args.batch}, {args.iters} steps; tiny preset shapes (teacher 8x512, student 4x256)")
    print("| processes | training tokens/s | training seconds | speed-up |")
    print("|---|---|---|---|")
    for n, tps, secs in rows:
        print(f"| {n} | {tps:.0f} | {secs:.1f} | {tps / rows[0][1]:.2f}x |")


if __name__ == "__main__":
    main()
