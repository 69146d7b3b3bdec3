"""The CORTEX neuron registry: immutable adapter versions per neuron (domain), one of them active.

    registry = NeuronRegistry("models/cortex_registry", base_model="default-student")
    v = registry.register("thinking", "models/distilled_neurons/adapters_kd/thinking", metrics={"val_kd": 1.9})
    registry.active("thinking")        # -> NeuronVersion (v), what CORTEX serves
    registry.promote("thinking", 1); registry.rollback("thinking")

Design (MLflow-style aliases over immutable versions):
* `register` copies the adapter into the registry's own store (`<root>/<neuron>/v0001/`), so retraining
  into the same output folder never changes a registered version; the copy is written to a temporary
  folder and renamed. Its sha256 is recorded; a duplicate (same sha256 for that neuron) is rejected, and
  so is an adapter whose files are missing/corrupt or whose shapes do not fit the base student.
* The manifest `<root>/registry.json` is written atomically (temp file, fsync, rename) under an
  inter-process file lock, after re-reading it, so two processes never lose each other's versions.
* In memory, writers build a new immutable `RegistryState` and swap the reference: readers never block
  and never see a half-registered state.
* A manifest that cannot be read or validated raises `RegistryError` and the registry keeps the state it
  had; nothing is overwritten.
* The optional quality gate refuses to activate a version that loops (its own answers to held-out prompts
  repeat themselves more than the teacher's, `loops`) or is worse than the active version (`worse_than`:
  held-out KL, agreement and repetition, or the validation KD loss when a version was not judged).
  Compare like with like: the gate trusts that both were judged on the same held-out prompts.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import structlog
from pydantic import BaseModel, ConfigDict, ValidationError

from conch_dna._faults import fault_point
from conch_dna.atomic import atomic_folder, atomic_write, sha256_file
from conch_dna.training.kd import signals

log = structlog.get_logger(__name__)

MANIFEST = "registry.json"
ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")


class RegistryError(RuntimeError):
    """The registry's manifest or store is unusable; the message says what and what to do."""


class DuplicateAdapterError(RegistryError):
    """This exact adapter (same sha256) is already a version of the neuron."""


class AdapterMismatchError(RegistryError):
    """The adapter's files are missing/corrupt, or its shapes do not fit the base student."""


class QualityGateError(RegistryError):
    """Promotion refused: the version loops or is worse than the active one (see `loops`, `worse_than`)."""


class NeuronNotFoundError(KeyError):
    """No such neuron, or no version of it."""

    def __str__(self) -> str:  # KeyError quotes its message; say it plainly
        return str(self.args[0]) if self.args else "neuron not found"


class NeuronVersion(BaseModel):
    """One registered adapter: immutable."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    neuron: str
    version: int
    path: str
    sha256: str
    metrics: dict = {}
    created: str
    teacher: str | None = None
    student: str | None = None


class NeuronRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    versions: tuple[NeuronVersion, ...] = ()
    active: int | None = None
    history: tuple[int, ...] = ()  # versions activated, in order (for rollback)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: int = 1
    base_model: str | None = None
    neurons: dict[str, NeuronRecord] = {}


@dataclass(frozen=True)
class RegistryState:
    neurons: dict[str, NeuronRecord] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ quality gate

# A neuron loops when its own answers repeat more 4-grams than the teacher's answers to the same held-out
# prompts by more than this (the acceptance bar; greedy 64-token answers of SmolLM2: 0.04-0.13).
REPETITION_MARGIN = 0.05
# Greedy answers to ~10 held-out prompts move by this much between equally good runs: smaller differences
# are not "worse".
TOLERANCE = {"held_out_kl": 0.02, "held_out_agreement": 0.02, "held_out_repetition": 0.02}


def loops(metrics: dict) -> str | None:
    """Why the neuron's own answers count as looping, or None (None also when it was not judged)."""
    rep, teacher = metrics.get("held_out_repetition"), metrics.get("held_out_teacher_repetition")
    if rep is None or teacher is None or rep <= teacher + REPETITION_MARGIN:
        return None
    return (f"loops: {rep:.2f} of the 4-grams of its held-out answers are repeats, the teacher's answers "
            f"{teacher:.2f} (allowed: + {REPETITION_MARGIN})")


def worse_than(new: dict, old: dict) -> str | None:
    """What makes `new` worse than `old`: the held-out figures when both were judged (KL up, agreement down,
    repetition up, each beyond `TOLERANCE`), else the validation KD loss."""
    if all(k in new and k in old and new[k] is not None and old[k] is not None for k in TOLERANCE):
        problems = []
        if new["held_out_kl"] > old["held_out_kl"] + TOLERANCE["held_out_kl"]:
            problems.append(f"held-out KL {new['held_out_kl']:.4f} > {old['held_out_kl']:.4f}")
        if new["held_out_agreement"] < old["held_out_agreement"] - TOLERANCE["held_out_agreement"]:
            problems.append(f"agreement {new['held_out_agreement']:.3f} < {old['held_out_agreement']:.3f}")
        if new["held_out_repetition"] > old["held_out_repetition"] + TOLERANCE["held_out_repetition"]:
            problems.append(f"repetition {new['held_out_repetition']:.3f} > {old['held_out_repetition']:.3f}")
        return "; ".join(problems) or None
    new_kd, old_kd = new.get("val_kd"), old.get("val_kd")
    if new_kd is None or old_kd is None:
        return "no held-out figures or val_kd metric to compare"
    return f"validation KD {new_kd:.4f} > {old_kd:.4f}" if new_kd > old_kd else None


# ------------------------------------------------------------------------------- shape validation


def base_linear_shapes(model_folder: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """{module path: (out_features, in_features)} of the base model's linear layers, from safetensors
    headers only (no weights are read). Quantized weights are unpacked using config.json's bits."""
    from safetensors import safe_open

    folder = Path(model_folder)
    config = json.loads((folder / "config.json").read_text())
    bits = (config.get("quantization") or {}).get("bits")
    shapes: dict[str, tuple[int, int]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "numpy") as st:
            for name in st.keys():
                if not name.endswith(".weight"):
                    continue
                shape = st.get_slice(name).get_shape()
                if len(shape) != 2:
                    continue
                out_f, in_f = shape
                if bits and name[: -len(".weight")] + ".scales" in st.keys():
                    in_f = in_f * 32 // bits
                shapes[name[: -len(".weight")]] = (int(out_f), int(in_f))
    return shapes


def check_adapter(adapter_dir: Path, base_shapes: dict[str, tuple[int, int]] | None) -> dict:
    """Validate an adapter folder; return its adapter_config. Raises AdapterMismatchError listing problems."""
    import mlx.core as mx

    for name in ADAPTER_FILES:
        if not (adapter_dir / name).is_file():
            raise AdapterMismatchError(f"{adapter_dir / name} is missing: an adapter folder needs {', '.join(ADAPTER_FILES)}")
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except json.JSONDecodeError as e:
        raise AdapterMismatchError(f"{adapter_dir / 'adapter_config.json'} is not valid JSON: {e}") from e
    try:
        weights = mx.load(str(adapter_dir / "adapters.safetensors"))
    except Exception as e:
        raise AdapterMismatchError(f"{adapter_dir / 'adapters.safetensors'} is corrupt or truncated ({e}); retrain or restore it") from e
    if not weights:
        raise AdapterMismatchError(f"{adapter_dir / 'adapters.safetensors'} holds no tensors")
    if base_shapes is None:
        return config
    problems = []
    rank = (config.get("lora_parameters") or {}).get("rank")
    for key, w in weights.items():
        module, _, leaf = key.rpartition(".")
        if leaf not in ("lora_a", "lora_b"):
            continue
        if module not in base_shapes:
            problems.append(f"{module}: not a linear layer of the base model")
            continue
        out_f, in_f = base_shapes[module]
        expected = (in_f, rank or w.shape[1]) if leaf == "lora_a" else (rank or w.shape[0], out_f)
        if tuple(w.shape) != expected:
            problems.append(f"{key}: shape {tuple(w.shape)}, the base model needs {expected}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
        raise AdapterMismatchError(f"adapter {adapter_dir} does not fit the base student ({len(problems)} problems): {shown}. "
                                   "Was it trained for another base model?")
    return config


# ------------------------------------------------------------------------------------------ registry


class NeuronRegistry:
    """The CORTEX neuron registry in folder `root`: immutable, sha256-checked versions of each neuron's adapter and
    which one is active, in one manifest (`registry.json`) that any number of processes read and write safely.
    `base_model`: the student the adapters are for; `quality_gate`: refuse to activate worse or looping versions."""

    def __init__(self, root: str | os.PathLike, base_model: str | os.PathLike | None = None, *, quality_gate: bool = False):
        self.root = Path(root)
        self.base_model = str(base_model) if base_model is not None else None
        self.quality_gate = quality_gate
        self._write_lock = threading.Lock()
        self._state = RegistryState()
        self._seen: tuple | None = None  # the manifest's (inode, mtime, size) when this process last read it
        self._base_shapes: dict | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RegistryError(f"cannot create the registry folder {self.root} ({e.strerror}); choose another with --registry") from e
        self.reload()

    # ----------------------------------------------------------------------------------- reading

    def neurons(self) -> list[str]:
        """The registered neurons' names, sorted."""
        return sorted(self._state.neurons)

    def versions(self, neuron: str) -> tuple[NeuronVersion, ...]:
        """Every version of `neuron`, oldest first."""
        return self._record(neuron).versions

    def active(self, neuron: str) -> NeuronVersion | None:
        """The version of `neuron` CORTEX serves, or None."""
        state = self._state  # one snapshot: active id and versions agree
        rec = state.neurons.get(neuron)
        if rec is None or rec.active is None:
            return None
        return next(v for v in rec.versions if v.version == rec.active)

    def get(self, neuron: str, version: int) -> NeuronVersion:
        """One version of `neuron`; `NeuronNotFoundError` if there is none."""
        for v in self._record(neuron).versions:
            if v.version == version:
                return v
        raise NeuronNotFoundError(f"neuron {neuron!r} has no version {version}")

    def _record(self, neuron: str) -> NeuronRecord:
        rec = self._state.neurons.get(neuron)
        if rec is None:
            raise NeuronNotFoundError(f"no neuron {neuron!r} in the registry at {self.root}; known: {', '.join(self.neurons()) or 'none'}")
        return rec

    def reload(self) -> None:
        """Read the manifest (e.g. after another process registered); on error keep the current state."""
        seen = self._manifest_stamp()
        self._state = RegistryState(dict(self._read_manifest().neurons))
        self._seen = seen

    def refresh(self) -> bool:
        """Reload if another process changed the manifest since it was last read; True if it did. Cheap enough
        for every request: one stat (every write replaces the file, so its inode and mtime change). A manifest
        that cannot be read keeps the current state (logged), so a server goes on serving."""
        if self._manifest_stamp() == self._seen:
            return False
        try:
            self.reload()
        except RegistryError as e:
            log.warning("registry manifest changed but cannot be read; serving the previous state", error=str(e))
            return False
        return True

    def _manifest_stamp(self) -> tuple | None:
        try:
            st = (self.root / MANIFEST).stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _read_manifest(self) -> Manifest:
        path = self.root / MANIFEST
        if not path.exists():
            return Manifest(base_model=self.base_model)
        try:
            manifest = Manifest.model_validate(json.loads(path.read_text()))
        except (json.JSONDecodeError, ValidationError, UnicodeDecodeError) as e:
            raise RegistryError(
                f"registry manifest {path} is corrupt or was edited into an invalid form ({str(e).splitlines()[0]}). "
                "The registry kept its previous state; restore the file from a backup or fix it by hand."
            ) from e
        for name, rec in manifest.neurons.items():
            known = {v.version for v in rec.versions}
            if missing := sorted({*([rec.active] if rec.active is not None else []), *rec.history} - known):
                raise RegistryError(
                    f"registry manifest {path}: neuron {name!r} names version(s) {missing} as active or in its history, "
                    f"but only has versions {sorted(known)}. The registry kept its previous state; fix `active` and "
                    "`history` in the file (or restore it from a backup).")
        return manifest

    # ----------------------------------------------------------------------------------- writing

    @contextmanager
    def _transaction(self):
        """Inter-process lock + fresh manifest; yields a mutable dict of neurons, then saves atomically."""
        with self._write_lock, open(self.root / ".registry.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                manifest = self._read_manifest()
                neurons = dict(manifest.neurons)
                yield neurons
                new = Manifest(base_model=manifest.base_model or self.base_model, neurons=neurons)
                self._write_manifest(new)
                self._state = RegistryState(dict(new.neurons))  # swap: readers see old or new, never half
                self._seen = self._manifest_stamp()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write_manifest(self, manifest: Manifest) -> None:
        atomic_write(self.root / MANIFEST, lambda p: p.write_text(manifest.model_dump_json(indent=2)))

    def _shapes(self):
        if self._base_shapes is None and self.base_model is not None:
            from conch_dna.models import model_path

            folder = model_path(self.base_model)
            if folder is not None and folder.is_dir():
                self._base_shapes = base_linear_shapes(folder)
        return self._base_shapes

    def register(self, neuron: str, adapter_dir: str | os.PathLike, metrics: dict | None = None, *,
                 teacher: str | None = None, student: str | None = None, activate: bool = True,
                 exist_ok: bool = False) -> NeuronVersion:
        """Copy the adapter in as the neuron's next version; activate it unless the quality gate refuses.

        An adapter already registered for this neuron (same sha256) is an error, or, with `exist_ok`, returns
        that version unchanged (what a resumed run that was killed after registering needs)."""
        from conch_dna.training.kd.data import check_name

        check_name(neuron, "neuron")
        adapter_dir = Path(adapter_dir)
        check_adapter(adapter_dir, self._shapes())
        digest = sha256_file(adapter_dir / "adapters.safetensors")
        with self._transaction() as neurons:
            rec = neurons.get(neuron, NeuronRecord())
            for v in rec.versions:
                if v.sha256 == digest and exist_ok:
                    return v
                if v.sha256 == digest:
                    raise DuplicateAdapterError(f"this adapter is already version {v.version} of neuron {neuron!r} (sha256 {digest[:12]}...)")
            store = self.root / neuron
            store.mkdir(parents=True, exist_ok=True)
            # Copies are made under the registry's lock: a temporary folder seen here was left by a writer
            # that died (a kill while registering), never one in progress.
            for stale in [*store.glob(".v[0-9]*.tmp-*"), *store.glob(".v[0-9]*.old-*")]:
                shutil.rmtree(stale, ignore_errors=True)
                log.info("removed a registry leftover", path=str(stale))
            taken = [v.version for v in rec.versions] + [int(p.name[1:]) for p in store.glob("v[0-9]*") if p.name[1:].isdigit()]
            number = max(taken, default=0) + 1
            dest = store / f"v{number:04d}"
            with atomic_folder(dest) as tmp:
                for name in ADAPTER_FILES:
                    shutil.copyfile(adapter_dir / name, tmp / name)
                fault_point("register")
                if sha256_file(tmp / "adapters.safetensors") != digest:
                    raise AdapterMismatchError(f"{adapter_dir} changed while it was being registered; try again")
            version = NeuronVersion(neuron=neuron, version=number, path=str(dest.resolve()), sha256=digest,
                                    metrics=dict(metrics or {}), created=datetime.now(UTC).isoformat(),
                                    teacher=teacher, student=student)
            rec = rec.model_copy(update={"versions": rec.versions + (version,)})
            active = False
            if activate:
                refusal = self._gate_refusal(rec, version)
                if refusal is None:
                    rec = rec.model_copy(update={"active": number, "history": rec.history + (number,)})
                    active = True
                else:
                    log.warning("quality gate kept the new version inactive", neuron=neuron, version=number, reason=refusal)
            neurons[neuron] = rec
        log.info("adapter registered", neuron=neuron, version=number, active=active, path=str(dest))
        signals.send(signals.adapter_registered, self, neuron=neuron, version=number, path=str(dest), sha256=digest, active=active)
        return version

    def _gate_refusal(self, rec: NeuronRecord, candidate: NeuronVersion) -> str | None:
        if not self.quality_gate:
            return None
        if (loop := loops(candidate.metrics)) is not None:
            return f"version {candidate.version} {loop}"
        if rec.active is None:
            return None
        current = next(v for v in rec.versions if v.version == rec.active)
        if (worse := worse_than(candidate.metrics, current.metrics)) is not None:
            return f"version {candidate.version} is worse than active version {current.version}: {worse}"
        return None

    def promote(self, neuron: str, version: int) -> NeuronVersion:
        """Make `version` the active one (quality gate applies when enabled)."""
        with self._transaction() as neurons:
            rec = neurons.get(neuron)
            if rec is None:
                raise NeuronNotFoundError(f"no neuron {neuron!r} in the registry")
            target = next((v for v in rec.versions if v.version == version), None)
            if target is None:
                raise NeuronNotFoundError(f"neuron {neuron!r} has no version {version}")
            if (refusal := self._gate_refusal(rec, target)) is not None:
                raise QualityGateError(f"not promoting {neuron} v{version}: {refusal}")
            neurons[neuron] = rec.model_copy(update={"active": version, "history": rec.history + (version,)})
        return target

    def rollback(self, neuron: str) -> NeuronVersion:
        """Re-activate the version that was active before the current one."""
        with self._transaction() as neurons:
            rec = neurons.get(neuron)
            if rec is None or len(rec.history) < 2:
                raise RegistryError(f"neuron {neuron!r} has no earlier active version to roll back to")
            history = rec.history[:-1]
            neurons[neuron] = rec.model_copy(update={"active": history[-1], "history": history})
            previous = history[-1]
        return self.get(neuron, previous)
