"""benchmarks/bench_kd.py and block_memory.py, sources of docs/benchmarks.md's figures, run and report what they claim to."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str) -> list[dict]:
    run = subprocess.run([sys.executable, "benchmarks/bench_kd.py", "--preset", "tiny", "--batch", "2", "--seq", "64", *args],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def test_step_mode_times_reference_and_fused():
    rows = bench("--steps", "1", "--chunk", "32", "--memory-limit-gb", "4", "--grad-checkpoint", "--checkpoint-scope", "mlp",
                 "--whole-blocks", "1")
    assert [r["impl"] for r in rows] == ["mlx-reference", "mlx-fused"]
    for r in rows:
        assert r["tok_s"] > 0 and r["peak_gb"] > 0 and r["B"] == 2 and r["T"] == 64 and r["memory_limit_gb"] == 4.0
        assert r["grad_checkpoint"] == "mlp every 1, first 1 whole"
    assert abs(rows[1]["loss"] - rows[0]["loss"]) <= 1e-3 * abs(rows[0]["loss"])  # same weights, same tokens


def test_trainer_mode_runs_the_trainer_loop_with_prefetch():
    (on,) = bench("--trainer", "--warmup", "2", "--steps", "1", "--prefetch", "on", "--grad-checkpoint",
                  "--checkpoint-scope", "mlp", "--whole-blocks", "1", "--lean-backward", "on", "--queue-mb", "64")
    (off,) = bench("--trainer", "--warmup", "2", "--steps", "1", "--prefetch", "off", "--lean-backward", "off")
    assert on["impl"] == "mlx-trainer" and on["teacher_prefetch"] is True and off["teacher_prefetch"] is False
    assert on["lean_backward"] is True and off["lean_backward"] is False
    assert on["grad_checkpoint"] == "mlp every 1, first 1 whole" and on["tok_s"] > 0 and on["peak_gb"] > 0
    # --queue-mb reaches MLX's environment (which its CPU backend ignores); without it, off CUDA, nothing is set.
    assert on["queue_mb"] == "64" and off["queue_mb"] is None


def test_trainer_mode_splits_the_peak_by_phase(monkeypatch):
    """--phase-peaks: the timed steps' peak while the teacher's pass is queued and otherwise, the larger of them
    the run's."""
    import argparse

    import benchmarks.bench_kd as bench_kd
    from conch_dna.training.kd import targets, trainer
    from conch_dna.training.kd.report import Step

    def teacher_of_64_mb(teacher, cfg, prefetch):
        def fn(idx, split, tokens):
            mx.eval(mx.ones((16, 2**20)))  # 64 MB alive while "the teacher's pass" is queued
        return fn

    def fake_train(student, data, cfg, out, *, adapter_cfg, hooks):
        for k in range(1, cfg.iters + 1):
            data.targets_fn([0], "train", None)
            mx.eval(mx.ones((4, 2**20)))  # 16 MB for "the student's step"
            hooks.reporter(Step(step=k, iters=cfg.iters, loss=1.0, kd=1.0, ce=1.0, ul=0.0, lr=1e-4, grad_norm=1.0,
                                tokens_per_second=0.0, peak_memory_gb=0.0, tokens=0))

    monkeypatch.setattr(targets, "online_targets", teacher_of_64_mb)
    monkeypatch.setattr(trainer, "train_with_kd", fake_train)
    args = argparse.Namespace(preset="tiny", batch=2, seq=32, warmup=1, steps=1, grad_accumulation=1, chunk=1024,
                              grad_checkpoint=False, checkpoint_every=1, checkpoint_scope="block", whole_blocks=0,
                              teacher_pass_tokens=4096, lean_backward="off", compile="off", prefetch="on",
                              memory_limit_gb=None, memory_budget_gb=None, kernels=False, phase_peaks=True)
    mx.synchronize()
    row = bench_kd.run_trainer(args)
    assert row["peak_teacher_gb"] - row["peak_rest_gb"] == pytest.approx(0.047, abs=0.011)  # 64 - 16 MB
    assert row["peak_gb"] == row["peak_teacher_gb"]

    (real,) = bench("--trainer", "--warmup", "2", "--steps", "1", "--phase-peaks")
    assert real["peak_gb"] == max(real["peak_teacher_gb"], real["peak_rest_gb"]) > 0


def test_preset_weights_are_counted_from_shapes_exactly():
    """The queue's bound is decided before any model is built (building one fixes it): from the shapes alone."""
    from benchmarks.bench_kd import PRESETS, build, preset_weights_bytes
    from conch_dna.training.kd.memory import param_bytes

    for name, (t_shape, s_shape, vocab, _, _) in PRESETS.items():
        built = sum(param_bytes(build(shape, vocab, mx.bfloat16, materialize=False)) for shape in (t_shape, s_shape))
        assert preset_weights_bytes(name) == built, name


def test_trainer_mode_times_whole_steps_with_one_more_step_after(monkeypatch):
    """The trainer's loop reads step k's figures once step k+1 is queued, with its teacher pass prefetched: the
    timed steps are followed by one untimed step (the last timed one then holds a teacher pass like the rest),
    and their time runs from the event of the last warm-up step to that of the last timed one."""
    import argparse

    import benchmarks.bench_kd as bench_kd
    from conch_dna.training.kd import trainer
    from conch_dna.training.kd.report import Step

    clock = {"t": 0.0}
    seen = {}

    def fake_train(student, data, cfg, out, *, adapter_cfg, hooks):
        seen["iters"] = cfg.iters
        for k in range(1, cfg.iters + 1):
            clock["t"] += 1.0 if k <= 3 else 10.0 * k  # warm-up steps fast; then steps 4, 5, 6 and one more
            hooks.reporter(Step(step=k, iters=cfg.iters, loss=1.0, kd=1.0, ce=1.0, ul=0.0, lr=1e-4, grad_norm=1.0,
                                tokens_per_second=0.0, peak_memory_gb=0.0, tokens=0))
        return {}

    monkeypatch.setattr(trainer, "train_with_kd", fake_train)
    monkeypatch.setattr(bench_kd.time, "perf_counter", lambda: clock["t"])
    args = argparse.Namespace(preset="tiny", batch=2, seq=32, warmup=3, steps=3, grad_accumulation=1, chunk=1024,
                              grad_checkpoint=False, checkpoint_every=1, checkpoint_scope="block", whole_blocks=0,
                              teacher_pass_tokens=4096, lean_backward="off", compile="off", prefetch="on",
                              memory_limit_gb=None, memory_budget_gb=None, kernels=False, phase_peaks=False)
    out = bench_kd.run_trainer(args)
    assert seen["iters"] == 3 + 3 + 1
    assert out["step_s"] == pytest.approx((40 + 50 + 60) / 3)  # not the 7th step's 70


def test_busy_share_counts_overlapping_kernels_once():
    from benchmarks.bench_kd import busy_share

    assert busy_share([]) == 0.0
    assert busy_share([(0, 10)]) == 1.0
    # two streams overlap on 5-8; idle 12-16 and 18-20 of the 0-24 span
    assert busy_share([(16, 18), (0, 8), (5, 12), (20, 24)]) == (12 + 2 + 4) / 24
    assert busy_share([(0, 10), (2, 3), (4, 10)]) == 1.0  # nested and touching


def test_idle_gaps_are_the_holes_between_busy_spans_longest_first():
    from benchmarks.bench_kd import busy_spans, idle_gaps

    kernels = [(16, 18), (0, 8), (5, 12), (20, 24), (21, 22)]
    assert busy_spans(kernels) == [(0, 12), (16, 18), (20, 24)]
    assert idle_gaps(kernels) == [4, 2] and idle_gaps([(0, 1)]) == [] and idle_gaps([]) == []


def test_kernel_breakdown_sums_time_and_launches_per_step_by_kind_and_name():
    from benchmarks.bench_kd import kernel_breakdown, kernel_kind

    assert kernel_kind("nvjet_sm90_tst_128x256_64x4_1x2_h_bz_coopA_NNN") == "matmul"
    assert kernel_kind("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16") == "attention"
    assert kernel_kind("mlx::core::cu::custom_kernel_conch_rope_bfloat16_t") == "ours"
    assert kernel_kind("void mlx::core::cu::rms_norm_vjp_small_fallback<__nv_bfloat16>") == "norm"
    assert kernel_kind("void mlx::core::cu::all_reduce<float, float, Sum, 8>") == "reduce"
    assert kernel_kind("void mlx::core::cu::copy_v<__nv_bfloat16, float>") == "copy"
    assert kernel_kind("void mlx::core::cu::CV2ISigmoidADV2IMultiplyACEV2OMultiplyDB") == "elementwise"
    # two steps: a matmul twice a step (3 ms + 1 ms each step), an elementwise kernel once (0.5 ms)
    events = [("nvjet_a", 0, 3000), ("nvjet_a", 3000, 4000), ("add", 4000, 4500),
              ("nvjet_a", 5000, 8000), ("nvjet_a", 8000, 9000), ("add", 9000, 9500)]
    out = kernel_breakdown(events, steps=2, top=1)
    assert out["kinds_ms_launches"] == {"matmul": [4.0, 2], "elementwise": [0.5, 1]}
    assert list(out["kinds_ms_launches"]) == ["matmul", "elementwise"]  # most time first
    assert out["top_kernels_ms_launches"] == [["nvjet_a", 4.0, 2]]


@pytest.mark.skipif(mx.cuda.is_available(), reason="on an NVIDIA GPU --kernels runs")
def test_kernels_without_a_cuda_gpu_is_refused():
    run = subprocess.run([sys.executable, "benchmarks/bench_kd.py", "--trainer", "--warmup", "2", "--kernels"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--kernels profiles CUDA kernels" in run.stderr


def test_block_memory_orders_the_checkpoint_scopes():
    """benchmarks/block_memory.py: a block keeps less with its MLP recomputed, and least recomputed whole; with
    the MLPs recomputed, each of the first blocks recomputed whole lowers the measured peak."""
    run = subprocess.run([sys.executable, "benchmarks/block_memory.py", "--seq", "64", "--mixed", "4"], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(x) for x in run.stdout.splitlines() if x.startswith("{")]
    kept = {r["scope"]: r["per_block_mib"] for r in rows if "scope" in r}
    assert kept["block"] < kept["mlp"] < kept["none"], kept
    mixed = [r["measured_mib"] for r in rows if "whole" in r]
    assert [r["whole"] for r in rows if "whole" in r] == [0, 1, 2, 4]
    assert all(a > b for a, b in zip(mixed, mixed[1:3])) and mixed[3] < mixed[0], mixed


FAKE_PEER = """import json, sys
b = int(sys.argv[1]); ckpt = "ckpt" in sys.argv[2:]
print("warming up")
print(json.dumps({"impl": "fake", "B": b, "T": 64, "tok_s": 1000.0 * b, "peak_gb": (0.01 if ckpt else 0.5) * b,
                  "extra": [a for a in sys.argv[2:] if a != "ckpt"]}))
"""


def test_frontier_runs_ours_and_a_peer_and_keeps_to_each_budget(tmp_path):
    """--frontier: our settings chosen per budget by settings_for_budget, the peer's batches with and without
    checkpointing, every run in its own process; per budget, only runs whose peak stayed within it count."""
    peer = tmp_path / "peer.py"
    peer.write_text(FAKE_PEER)
    out = tmp_path / "frontier.jsonl"
    run = subprocess.run([sys.executable, "benchmarks/bench_kd.py", "--preset", "tiny", "--seq", "64", "--frontier",
                          "--budgets", "0.05", "1000", "--frontier-batches", "2", "--steps", "1", "--peer-liger", str(peer),
                          "--peer-batches", "2", "4", "--peer-arg", "teacher=3b", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["extra"] == ["teacher=3b"] for r in rows if r["who"] == "liger")  # --peer-arg reaches every peer run
    ours = [r for r in rows if r["who"] == "conch_dna"]
    liger = [r for r in rows if r["who"] == "liger"]
    assert ours and all(r["tok_s"] > 0 and r["peak_gb"] > 0 and r["B"] == 2 for r in ours), ours
    assert sorted(r["label"] for r in liger) == ["liger B2", "liger B2 ckpt", "liger B4", "liger B4 ckpt"]
    table = {line.split("|")[1].strip(): line for line in run.stdout.splitlines() if line.startswith("| ") and "GB |" in line}
    # 0.05 GB: of the peer's runs only the checkpointed ones fit (0.02, 0.04 GB); the best is B4 at 4000 tokens/s.
    assert "**4.0k** (4.0k), liger B4 ckpt, 0.0" in table["0.05 GB"]
    # 1000 GB: everything fits; the peer's best is still 4000 tokens/s, and the ratio is ours over it.
    best_ours = max(r["tok_s"] for r in ours)
    assert f"{best_ours / 4000:.2f}x" in table["1000 GB"]
    # The table can be rebuilt from the JSON lines alone.
    again = subprocess.run([sys.executable, "benchmarks/bench_kd.py", "--summarise", str(out), "--budgets", "0.05", "1000"],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert again.returncode == 0 and table["1000 GB"] in again.stdout
    # ...also from several files (repeats split over calls): their runs pooled per setting.
    lines = out.read_text().splitlines(keepends=True)
    halves = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    halves[0].write_text("".join(lines[: len(lines) // 2]))
    halves[1].write_text("".join(lines[len(lines) // 2:]))
    split = subprocess.run([sys.executable, "benchmarks/bench_kd.py", "--summarise", *map(str, halves), "--budgets", "0.05", "1000"],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert split.returncode == 0 and split.stdout == again.stdout
