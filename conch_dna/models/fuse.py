"""A LoRA adapter fused into its base model's weights, written as a new model folder.

What makes a healed student a base of its own: a pruned student healed by corpus KD (one adapter) becomes a
plain model folder that every domain's neuron is then distilled onto, one adapter each, as on any student
(prune, heal, specialise: docs/guide.md, "A faster student").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from conch_dna.models.gguf_convert import write_derived_folder


class FuseError(ValueError):
    """An adapter that cannot be fused into the given base model."""


def fuse_adapter(base: str | os.PathLike, adapter: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Write the model folder `dest`: the mlx-lm folder `base` with the LoRA adapter folder `adapter` (mlx-lm's
    format) added into its weights, in the base's stored dtype and quantization (mlx-lm's `fuse`). The adapter
    is checked against the base (every tensor a LoRA parameter of it, of its shape) before anything is written;
    `dest` is written whole or not at all, and a folder there that this tool did not write is refused."""
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model as mlx_load_model

    from conch_dna.atomic import check_replaceable, sha256_file
    from conch_dna.models import check_model_folder

    base_dir, adapter_dir = check_model_folder(str(base)), Path(adapter)
    if base_dir is None:
        raise FuseError(f"base model {base} is not a local model folder; give the folder the adapter was trained on")
    for name in ("adapter_config.json", "adapters.safetensors"):
        if not (adapter_dir / name).is_file():
            raise FuseError(f"{adapter_dir / name} is missing: an adapter folder (mlx-lm's format) holds "
                            "adapter_config.json and adapters.safetensors")
    check_replaceable(dest)
    model, config = mlx_load_model(base_dir, lazy=True)
    try:
        load_adapters(model, str(adapter_dir))
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        raise FuseError(f"adapter {adapter_dir} does not fit base model {base_dir}: {e}") from e
    model.update_modules(tree_unflatten([(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]))
    info = {"fused_from": str(base_dir), "adapter": str(adapter_dir),
            "adapter_sha256": sha256_file(adapter_dir / "adapters.safetensors")}
    return write_derived_folder(dest, dict(tree_flatten(model.parameters())), config, base_dir, info)
