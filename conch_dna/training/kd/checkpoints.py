"""Checkpoints and the adapter on disk: mlx-lm's adapter format, checkpoints written whole or not at all,
and the checks that a resume continues the same run (`check_resumable`, `checkpoint_differences`,
`run_differences`). A checkpoint holds the adapter, the optimizer state (per parameter) and the step: batch `s`
is a function of (seed, s), so nothing else is needed to resume exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import structlog
from mlx.utils import tree_flatten, tree_unflatten

from conch_dna._faults import fault_point
from conch_dna.atomic import ForeignFolderError, atomic_folder, atomic_write, remove_folder, sha256_file
from conch_dna.training.kd.config import KDConfig
from conch_dna.training.kd.flat import FlatLayout
from conch_dna.training.kd.update import per_parameter_state

log = structlog.get_logger(__name__)


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint to resume from is unreadable or does not fit this run; the message says what to do."""


def adapter_config(config: KDConfig, num_layers: int, extra: dict | None = None) -> dict:
    """mlx-lm's adapter_config.json (read by mlx_lm.load/generate/fuse), plus our provenance. "model" is what
    stock mlx-lm can load: the student's folder for a local or offline model, else its hub id."""
    from conch_dna.models import model_path

    folder = model_path(config.student_model_id)
    return {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": config.lora_parameters(),
        "model": str(folder.resolve()) if folder is not None else config.student_model_id,
        "conch_kd": {
            "teacher": config.teacher_model_id,
            **{k: v for k, v in config.model_dump(mode="json").items() if k in RUN_SETTINGS},
            "batch": config.batch_size * config.grad_accumulation,
            **(extra or {}),
        },
    }


# What a run trains on, besides the adapter's shape: a resume that would change one of these mixes two runs in
# one adapter, so it is refused (`run_differences`). Memory and speed settings, and iters, may change.
RUN_SETTINGS = ("temperature", "alpha", "divergence", "jsd_beta", "unlikelihood", "no_repeat_teacher", "own_answers",
                "on_policy_lambda", "teacher_targets", "top_k", "uld_weight", "uld_top_k", "text", "text_share",
                "text_max_tokens", "seed", "max_seq_length", "learning_rate", "lr_schedule", "warmup_steps",
                "weight_decay", "max_grad_norm", "generation")


# Recorded for information only, or settled during the run.
RUN_FREE = {"run_id", "teacher"}


def run_differences(saved_cfg: dict, run_cfg: dict) -> list[str]:
    """What a checkpoint was trained on that this run would not train on: the settings, the teacher's weights,
    the domain and the data (`conch_kd` of the two adapter configs). Keys a checkpoint did not record, and a
    learning rate this run has not settled yet, are not compared."""
    saved, run = saved_cfg.get("conch_kd") or {}, run_cfg.get("conch_kd") or {}
    return [f"{key}: checkpoint {saved[key]!r}, this run {run.get(key)!r}" for key in sorted(saved)
            if key not in RUN_FREE and not (key == "learning_rate" and run.get(key) is None) and saved[key] != run.get(key)]


def save_adapter(model: nn.Module, folder: Path, config_dict: dict) -> Path:
    """adapters.safetensors + adapter_config.json in `folder`, each written atomically (config first:
    mlx-lm reads the config to build the layers, then validates the weights' names and shapes)."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    atomic_write(folder / "adapter_config.json", lambda p: p.write_text(json.dumps(config_dict, indent=2)))
    fault_point("adapter")
    atomic_write(folder / "adapters.safetensors", lambda p: mx.save_safetensors(str(p), weights, {"format": "mlx"}))
    return folder / "adapters.safetensors"


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a complete one has state.json; temp folders start with '.')."""
    return sorted(p for p in out_dir.glob("checkpoint_*") if (p / "state.json").is_file())


def save_checkpoint(model, optimizer, out_dir: Path, step: int, state: dict, config_dict: dict, keep: int) -> Path:
    final = out_dir / f"checkpoint_{step:06d}"
    with atomic_folder(final) as tmp:
        mx.save_safetensors(str(tmp / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
        layout = FlatLayout.of(model.trainable_parameters())
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(per_parameter_state(optimizer.state, layout))))
        (tmp / "adapter_config.json").write_text(json.dumps(config_dict, indent=2))
        fault_point("checkpoint")
        digests = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
        # state.json last: a checkpoint folder is complete iff it has one (and the rename made it visible).
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "sha256": digests}, indent=2))
    for old in checkpoint_dirs(out_dir)[:-keep]:
        try:
            remove_folder(old)
        except ForeignFolderError as e:  # someone put their own files there: keep the folder, say so
            log.warning("old checkpoint kept", reason=str(e))
    return final


def load_checkpoint(model, optimizer, ckpt: Path, adapter_cfg: dict | None = None) -> dict:
    """Load `ckpt`'s adapter and optimizer state into `model` and `optimizer`; its state.json. Refused
    (`CheckpointError`, nothing loaded) when it is unreadable, or when it holds another adapter than this
    run trains: other LoRA settings, layers or student (`adapter_cfg`), other parameter names or shapes."""
    try:
        state = json.loads((ckpt / "state.json").read_text())
        for name, digest in state.get("sha256", {}).items():
            if sha256_file(ckpt / name) != digest:
                raise ValueError(f"{name} does not match the sha256 recorded when it was saved")
        adapters = mx.load(str(ckpt / "adapters.safetensors"))
        opt_state = mx.load(str(ckpt / "optimizer.safetensors"))
        saved_cfg = json.loads((ckpt / "adapter_config.json").read_text())
    except Exception as e:
        raise CheckpointError(f"checkpoint {ckpt} is unreadable ({e}); delete it to resume from an earlier one") from e
    _refuse_other_adapter(ckpt, checkpoint_differences(saved_cfg, adapter_cfg or saved_cfg, adapters, model))
    model.load_weights(list(adapters.items()), strict=False)
    optimizer.state = tree_unflatten(list(opt_state.items()))
    return state


def check_resumable(out_dir: Path, run_cfg: dict) -> None:
    """Before any work: the latest checkpoint in `out_dir` (if any) was made with this run's LoRA settings,
    student, settings, teacher, domain and data, else `CheckpointError` listing every difference (the arrays
    themselves are compared when it is loaded)."""
    ckpts = checkpoint_dirs(out_dir) if out_dir.is_dir() else []
    if not ckpts:
        return
    try:
        saved = json.loads((ckpts[-1] / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpts[-1]} is unreadable ({e}); delete it to resume from an earlier one") from e
    _refuse_other_adapter(ckpts[-1], checkpoint_differences(saved, run_cfg, keys=("fine_tune_type", "lora_parameters", "model"))
                          + run_differences(saved, run_cfg))


def _refuse_other_adapter(ckpt: Path, differences: list[str]) -> None:
    if differences:
        raise CheckpointError(f"checkpoint {ckpt} holds another adapter than this run trains ({'; '.join(differences)}): "
                              "resume with the settings it was made with, or start afresh without --resume "
                              "(or with another --output)")


def checkpoint_differences(saved_cfg: dict, run_cfg: dict, adapters: dict | None = None, model: nn.Module | None = None,
                           keys=("fine_tune_type", "num_layers", "lora_parameters", "model")) -> list[str]:
    """What a checkpoint holds that this run would not: LoRA settings, adapted layers, the student (`keys` of
    the two adapter configs), and the names and shapes of the adapter's arrays (given `adapters`, `model`)."""
    out = [f"{key}: checkpoint {saved_cfg.get(key)!r}, this run {run_cfg.get(key)!r}"
           for key in keys if saved_cfg.get(key) != run_cfg.get(key)]
    if adapters is None or model is None:
        return out
    mine = dict(tree_flatten(model.trainable_parameters()))
    if missing := sorted(set(mine) - set(adapters)):
        out.append(f"{len(missing)} LoRA arrays missing from it (e.g. {missing[0]})")
    if extra := sorted(set(adapters) - set(mine)):
        out.append(f"{len(extra)} arrays this model does not have (e.g. {extra[0]})")
    if shapes := [k for k in sorted(set(mine) & set(adapters)) if tuple(mine[k].shape) != tuple(adapters[k].shape)]:
        k = shapes[0]
        out.append(f"{len(shapes)} arrays of other shapes (e.g. {k}: checkpoint {tuple(adapters[k].shape)}, "
                   f"this run {tuple(mine[k].shape)})")
    return out
