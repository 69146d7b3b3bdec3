"""Crash safety: SIGKILL the CLI at every fault point and at random moments; resume; the final adapter equals
an uninterrupted run's, bit for bit, and the registry's active version always loads. Plus disk full, a
second process on the same output, a corrupt checkpoint, a NaN teacher."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conch_dna.cortex import NeuronRegistry
from conch_dna.cortex.registry import sha256_file
from tests.conftest import PROMPTS, cli_config


def cli(tiny_pair, tmp_path, out, registry, fault=None, timeout=120, kill_after=None, iters=8):
    teacher, student = tiny_pair
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    cfg = tmp_path / "kd.toml"
    cfg.write_text(cli_config(batch_size=2, iters=iters, gen_batch=4))
    env = {**os.environ, "CONCH_FAULT_POINT": fault or ""}
    cmd = [sys.executable, "-m", "conch_dna.training.kd", "--domain", "thinking", "--prompts", str(prompts),
           "--teacher", str(teacher), "--student", str(student), "--output", str(out), "--registry", str(registry),
           "--config", str(cfg), "--resume", "--log-json"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill_after is not None:
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
    out_s, err_s = proc.communicate(timeout=timeout)
    return proc.returncode, out_s, err_s


def registry_is_sane(root: Path) -> None:
    """Whatever happened, the registry loads, and its active version's files exist with the recorded sha256."""
    if not (root / "registry.json").exists():
        return
    reg = NeuronRegistry(root)
    v = reg.active("thinking")
    if v is not None:
        folder = reg.verify(v)  # every file against its recorded sha256
        assert sha256_file(folder / "adapters.safetensors") == v.sha256
        assert json.loads((folder / "adapter_config.json").read_text())["fine_tune_type"] == "lora"


def test_sigkill_at_every_fault_point_then_resume_equals_uninterrupted(tiny_pair, tmp_path):
    rc, out, err = cli(tiny_pair, tmp_path, tmp_path / "ref", tmp_path / "ref_reg")
    assert rc == 0, err[-2000:]
    reference = mx.load(str(tmp_path / "ref/thinking/adapters.safetensors"))

    out_dir, reg = tmp_path / "run", tmp_path / "reg"
    faults = ["generation", "step:3", "checkpoint:2", "step:2", "adapter", "register"]
    for fault in faults:
        rc, _, err = cli(tiny_pair, tmp_path, out_dir, reg, fault=fault)
        assert rc == -signal.SIGKILL, (fault, rc, err[-2000:])
        registry_is_sane(reg)
    rc, out, err = cli(tiny_pair, tmp_path, out_dir, reg)
    assert rc == 0, err[-2000:]
    final = mx.load(str(out_dir / "thinking/adapters.safetensors"))
    assert final.keys() == reference.keys()
    for k in final:
        assert np.array_equal(np.array(final[k]), np.array(reference[k])), k
    registry_is_sane(reg)
    assert [v.version for v in NeuronRegistry(reg).versions("thinking")] == [1]
    assert not list((out_dir / "thinking").glob(".checkpoint_*"))  # crash leftovers cleaned


def test_random_sigkills_never_lose_finished_work(tiny_pair, tmp_path):
    rng = random.Random(0)
    out_dir, reg = tmp_path / "run", tmp_path / "reg"
    kills = 0
    for _ in range(4):
        # 300 steps (checkpoint every 2) take well over 3 s on any machine, so a kill 1-3 s in always lands
        # in the first run; later runs resume and may be killed at any point, or finish.
        rc, _, _ = cli(tiny_pair, tmp_path, out_dir, reg, kill_after=rng.uniform(1.0, 3.0), iters=300)
        kills += rc == -signal.SIGKILL
        registry_is_sane(reg)
        for ckpt in (out_dir / "thinking").glob("checkpoint_*"):  # every visible checkpoint is complete
            assert {p.name for p in ckpt.iterdir()} >= {"adapters.safetensors", "optimizer.safetensors", "state.json"}
    rc, _, err = cli(tiny_pair, tmp_path, out_dir, reg, iters=300)
    assert rc == 0, err[-2000:]
    registry_is_sane(reg)
    assert kills >= 1


def test_second_process_on_the_same_output_is_refused(tiny_pair, tmp_path):
    from conch_dna.training.kd.distiller import output_lock

    folder = tmp_path / "out" / "thinking"
    with output_lock(folder):
        rc, _, err = cli(tiny_pair, tmp_path, tmp_path / "out", tmp_path / "reg")
    assert rc == 2 and "being written by another process" in err and f"pid {os.getpid()}" in err


def test_disk_full_while_saving_keeps_the_previous_files(tiny_pair, kd_config, monkeypatch):
    from conch_dna.training.kd import TrueKnowledgeDistiller, trainer

    cfg = kd_config(iters=4, checkpoint_interval=2)
    d = TrueKnowledgeDistiller(str(tiny_pair[0]), str(tiny_pair[1]), cfg)
    d.distill_domain("thinking", PROMPTS)
    out = cfg.output_dir / "thinking"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix in (".safetensors", ".json")}
    real = mx.save_safetensors

    def full(path, *a, **k):
        real(path, *a, **k)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer.mx, "save_safetensors", full)
    with pytest.raises(OSError, match="No space left"):
        TrueKnowledgeDistiller(str(tiny_pair[0]), str(tiny_pair[1]), cfg.model_copy(update={"iters": 6})).distill_domain(
            "thinking", PROMPTS, resume=True)
    monkeypatch.setattr(trainer.mx, "save_safetensors", real)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix in (".safetensors", ".json")}
    assert after["adapters.safetensors"] == before["adapters.safetensors"]  # the finished adapter is intact
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".lock"]  # no temp files left
    assert [c.name for c in sorted(out.glob("checkpoint_*"))] == ["checkpoint_000002", "checkpoint_000004"]


def test_a_crash_while_removing_an_old_checkpoint_leaves_no_half_checkpoint(tiny_pair, kd_config, monkeypatch):
    """Old checkpoints are pruned by renaming them away first: a crash halfway through deleting one (here
    after its first file) leaves only a hidden leftover, never a `checkpoint_*` folder missing files; the
    next run removes the leftover and resumes from the newest complete checkpoint."""
    from conch_dna import atomic
    from conch_dna.training.kd import TrueKnowledgeDistiller

    class Killed(BaseException):
        pass

    def die_halfway(path, ignore_errors=False):
        next(f for f in sorted(Path(path).iterdir())).unlink()
        raise Killed

    cfg = kd_config(iters=6, checkpoint_interval=2, keep_checkpoints=1)
    monkeypatch.setattr(atomic.shutil, "rmtree", die_halfway)
    with pytest.raises(Killed):  # at step 4 the step-2 checkpoint is pruned
        TrueKnowledgeDistiller(str(tiny_pair[0]), str(tiny_pair[1]), cfg).distill_domain("thinking", PROMPTS)
    monkeypatch.undo()
    out = cfg.output_dir / "thinking"
    for ckpt in out.glob("checkpoint_*"):
        assert {"adapters.safetensors", "optimizer.safetensors", "state.json"} <= {p.name for p in ckpt.iterdir()}
    assert [p.name for p in out.glob("checkpoint_*")] == ["checkpoint_000004"]
    assert len(list(out.glob(".checkpoint_000002.old-*"))) == 1
    TrueKnowledgeDistiller(str(tiny_pair[0]), str(tiny_pair[1]), cfg).distill_domain("thinking", PROMPTS, resume=True)
    assert not list(out.glob(".checkpoint_*")) and [p.name for p in out.glob("checkpoint_*")] == ["checkpoint_000006"]


def test_corrupt_checkpoint_is_refused_clearly(tiny_pair, kd_config):
    from conch_dna.training.kd import TrueKnowledgeDistiller

    cfg = kd_config(iters=4, checkpoint_interval=2)
    TrueKnowledgeDistiller(str(tiny_pair[0]), str(tiny_pair[1]), cfg).distill_domain("thinking", PROMPTS)
    ckpt = cfg.output_dir / "thinking" / "checkpoint_000004" / "optimizer.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:50])
    with pytest.raises(RuntimeError, match="checkpoint .* is unreadable"):
        TrueKnowledgeDistiller(str(tiny_pair[0]), str(tiny_pair[1]), cfg.model_copy(update={"iters": 6})).distill_domain(
            "thinking", PROMPTS, resume=True)


def test_nan_teacher_stops_with_a_clear_error(tiny_pair, kd_config, monkeypatch):
    from conch_dna.training.kd import TrainingDivergedError, TrueKnowledgeDistiller, targets

    monkeypatch.setattr(targets, "teacher_logits", lambda model, tokens: model(tokens) * float("nan"))
    cfg = kd_config(teacher_targets="online", loss_impl="reference")
    d = TrueKnowledgeDistiller(str(tiny_pair[0]), str(tiny_pair[1]), cfg)
    monkeypatch.setattr(targets, "parts_match", lambda m: False)  # force the logits path
    with pytest.raises(TrainingDivergedError, match="step 1"):
        d.distill_domain("thinking", PROMPTS)
    assert not (cfg.output_dir / "thinking" / "adapters.safetensors").exists()


def test_corrupt_teacher_cache_shard_is_detected(tiny_pair, kd_config):
    from conch_dna.training.kd import DataError, TrueKnowledgeDistiller
    from conch_dna.training.kd.teacher_cache import TeacherCache

    cfg = kd_config()
    d = TrueKnowledgeDistiller(str(tiny_pair[0]), str(tiny_pair[1]), cfg)
    d.generate_training_data(PROMPTS, "thinking")
    folder = next((cfg.output_dir / "teacher_cache").iterdir())
    shard = folder / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte inside the tensor data: still loadable, but wrong
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="corrupt"):
        TeacherCache.load(folder)


def test_bit_flip_in_a_checkpoint_is_detected(tiny_pair, kd_config):
    from conch_dna.training.kd import TrueKnowledgeDistiller

    cfg = kd_config(iters=2, checkpoint_interval=2)
    TrueKnowledgeDistiller(str(tiny_pair[0]), str(tiny_pair[1]), cfg).distill_domain("thinking", PROMPTS)
    f = cfg.output_dir / "thinking" / "checkpoint_000002" / "adapters.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="sha256"):
        TrueKnowledgeDistiller(str(tiny_pair[0]), str(tiny_pair[1]), cfg.model_copy(update={"iters": 4})).distill_domain(
            "thinking", PROMPTS, resume=True)


@pytest.mark.parametrize(("fault", "code"), [("generation:1:SIGTERM", 143), ("step:3:SIGINT", 130),
                                             ("step:2:SIGTERM", 143)])
def test_sigterm_and_sigint_stop_cleanly_and_resume_equals_uninterrupted(tiny_pair, tmp_path, fault, code):
    """A SIGTERM / SIGINT during teacher generation or training stops at the next batch or step: exit 128 +
    the signal, a message, a checkpoint at the step reached (training), nothing registered; --resume then
    finishes with the adapter of an uninterrupted run, bit for bit."""
    rc, _, err = cli(tiny_pair, tmp_path, tmp_path / "ref", tmp_path / "ref_reg")
    assert rc == 0, err[-2000:]
    reference = mx.load(str(tmp_path / "ref/thinking/adapters.safetensors"))
    out_dir, reg = tmp_path / "run", tmp_path / "reg"
    rc, _, err = cli(tiny_pair, tmp_path, out_dir, reg, fault=fault)
    assert rc == code, err[-2000:]
    assert "Traceback" not in err and "stopping at the next step" in err and "--resume" in err
    assert not (out_dir / "thinking/adapters.safetensors").exists() and not (reg / "registry.json").exists()
    if fault.startswith("step"):
        step = int(fault.split(":")[1])  # the signal lands inside step n; the stop comes before step n + 1
        assert (out_dir / f"thinking/checkpoint_{step:06d}/state.json").is_file()
    else:
        assert not list(out_dir.glob("thinking/checkpoint_*")) and not list(out_dir.glob("teacher_cache/*/meta.json"))
    rc, _, err = cli(tiny_pair, tmp_path, out_dir, reg)
    assert rc == 0, err[-2000:]
    resumed = mx.load(str(out_dir / "thinking/adapters.safetensors"))
    for k in reference:
        assert np.array_equal(np.array(reference[k]), np.array(resumed[k])), k
    registry_is_sane(reg)


def test_storage_errors_become_a_clear_write_error(tmp_path, monkeypatch):
    """MLX's own message for a full disk ("[write] Unable to write ...") and ENOSPC both become `WriteError`
    (exit 2 in the CLI) naming the file; the previous file stays and no temporary is left."""
    from conch_dna.atomic import WriteError, atomic_folder, atomic_write

    target = tmp_path / "a.safetensors"
    mx.save_safetensors(str(target), {"a": mx.ones((4,))})
    before = target.read_bytes()

    def mlx_full(path, *a, **k):
        raise RuntimeError("[write] Unable to write 3934560 bytes to file.")

    with pytest.raises(WriteError, match="could not write .*a.safetensors.*Nothing was replaced"):
        atomic_write(target, lambda p: mlx_full(p))
    with pytest.raises(WriteError, match="No space left"):
        with atomic_folder(tmp_path / "ckpt"):
            raise OSError(28, "No space left on device")
    with pytest.raises(ValueError):  # other errors pass through unchanged
        atomic_write(target, lambda p: (_ for _ in ()).throw(ValueError("a bug")))
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_a_really_full_disk_keeps_the_previous_file(tmp_path):
    """On a real 64 KiB tmpfs (needs root and mount; skipped elsewhere): MLX cannot write a 4 MB adapter
    there; the write stops with `WriteError` and the file it would have replaced is unchanged."""
    from conch_dna.atomic import WriteError, atomic_write

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        target = small / "adapters.safetensors"
        mx.save_safetensors(str(target), {"a": mx.ones((16,))})
        before = target.read_bytes()
        with pytest.raises(WriteError, match="could not write"):
            atomic_write(target, lambda p: mx.save_safetensors(str(p), {"a": mx.ones((1000, 1000))}))
        assert target.read_bytes() == before and [p.name for p in small.iterdir()] == ["adapters.safetensors"]
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)
