"""scripts/bench_kd.py and block_memory.py, sources of docs/benchmarks.md's figures, run and report what they claim to."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str) -> list[dict]:
    run = subprocess.run([sys.executable, "scripts/bench_kd.py", "--preset", "tiny", "--batch", "2", "--seq", "64", *args],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def test_step_mode_times_reference_and_fused():
    rows = bench("--steps", "1", "--chunk", "32", "--memory-limit-gb", "4")
    assert [r["impl"] for r in rows] == ["mlx-reference", "mlx-fused"]
    for r in rows:
        assert r["tok_s"] > 0 and r["peak_gb"] > 0 and r["B"] == 2 and r["T"] == 64 and r["memory_limit_gb"] == 4.0
    assert abs(rows[1]["loss"] - rows[0]["loss"]) <= 1e-3 * abs(rows[0]["loss"])  # same weights, same tokens


def test_trainer_mode_runs_the_trainer_loop_with_prefetch():
    (on,) = bench("--trainer", "--warmup", "2", "--steps", "1", "--prefetch", "on", "--grad-checkpoint",
                  "--checkpoint-scope", "mlp")
    (off,) = bench("--trainer", "--warmup", "2", "--steps", "1", "--prefetch", "off")
    assert on["impl"] == "mlx-trainer" and on["teacher_prefetch"] is True and off["teacher_prefetch"] is False
    assert on["grad_checkpoint"] == "mlp every 1" and on["tok_s"] > 0 and on["peak_gb"] > 0


def test_block_memory_orders_the_checkpoint_scopes():
    """scripts/block_memory.py: a block keeps less with its MLP recomputed, and least recomputed whole."""
    run = subprocess.run([sys.executable, "scripts/block_memory.py", "--seq", "64"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    kept = {r["scope"]: r["per_block_mib"] for r in map(json.loads, (x for x in run.stdout.splitlines() if x.startswith("{")))}
    assert kept["block"] < kept["mlp"] < kept["none"], kept
