"""The CORTEX neuron registry: immutable adapter versions per neuron (domain), one of them active.

    registry = NeuronRegistry("models/cortex_registry", base_model="default-student")
    v = registry.register("thinking", "models/distilled_neurons/adapters_kd/thinking", metrics={"val_kd": 1.9})
    registry.active("thinking")        # -> NeuronVersion (v), what CORTEX serves
    registry.promote("thinking", 1); registry.rollback("thinking")

Design (MLflow-style aliases over immutable versions):
* `register` copies the adapter into the registry's own store (`<root>/<neuron>/v0001/`), so retraining
  into the same output folder never changes a registered version; the copy is written to a temporary
  folder and renamed. The sha256 of every file of the version is recorded; a duplicate (same adapter
  weights for that neuron) is rejected, and so is an adapter whose files are missing/corrupt, whose shapes
  do not fit the base student, or that was trained on another student than the registry's base.
* Nothing read back is trusted: a version's folder is always `<root>/<neuron>/v<NNNN>` (the manifest's
  `path` is informational and relative), only regular files inside the registry are opened, and CORTEX
  checks every file's sha256 before it serves a version. A registry holds adapters of one base model, named
  in its manifest; opening it for another base is refused.
* The manifest `<root>/registry.json` is written atomically (temp file, fsync, rename) under an
  inter-process file lock, after re-reading it, so two processes never lose each other's versions.
* In memory, writers build a new immutable `RegistryState` and swap the reference: readers never block
  and never see a half-registered state.
* A manifest that cannot be read or validated raises `RegistryError` and the registry keeps the state it
  had; nothing is overwritten.
* The optional quality gate refuses to activate a version that loops (its own answers to held-out prompts
  repeat themselves more than the teacher's, `loops`) or is worse than the active version (`worse_than`:
  held-out KL, agreement and repetition, or the validation KD loss when a version was not judged).
  Compare like with like: the gate trusts that both were judged on the same held-out prompts. Figures that
  are missing or not finite are a refusal, never a pass.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import stat
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import structlog
from pydantic import BaseModel, ConfigDict, ValidationError

from conch_dna._faults import fault_point
from conch_dna.atomic import atomic_folder, atomic_write, check_writable, sha256_file
from conch_dna.training.kd import signals

log = structlog.get_logger(__name__)

MANIFEST = "registry.json"
ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")
# A manifest larger than this is not one this registry wrote (each version adds ~1 KB).
MANIFEST_MAX_BYTES = 64 << 20
# Activations remembered for rollback, per neuron.
HISTORY_LIMIT = 100


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
    path: str  # relative to the registry: <neuron>/v<NNNN> (a version's folder is always there)
    sha256: str  # of adapters.safetensors: the same weights are the same adapter
    files: dict[str, str] = {}  # sha256 of every file of the version, checked before it is served
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
# prompts by more than this (greedy 64-token answers of SmolLM2: 0.04-0.13).
REPETITION_MARGIN = 0.05
# Versions judged without intervals: greedy answers to ~10 held-out prompts move by this much between equally
# good runs, so smaller differences are not "worse".
TOLERANCE = {"held_out_kl": 0.02, "held_out_agreement": 0.02, "held_out_repetition": 0.02}
# Versions judged with intervals over their held-out prompts (`evaluate.intervals`, 90%): the gate decides on
# these instead. "lower" says which way is better.
INTERVALS = {"held_out_kl": "lower", "held_out_agreement": "higher", "held_out_repetition": "lower"}
EXCESS = "held_out_repetition_excess"


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _has_intervals(metrics: dict) -> bool:
    return f"{EXCESS}_high" in metrics


def _interval_keys() -> list[str]:
    return [f"{k}_{end}" for k in (*INTERVALS, EXCESS) for end in ("low", "high")]


def unusable_figures(metrics: dict) -> str | None:
    """Why a version's figures cannot be judged (missing or not finite), or None. A version judged on held-out
    prompts needs every held-out figure the gate compares (and their intervals, when it was judged with them);
    one that was not needs a finite validation KD."""
    needed = [*TOLERANCE, "held_out_teacher_repetition"] + (_interval_keys() if _has_intervals(metrics) else [])
    if any(k in metrics for k in needed):
        bad = [k for k in needed if not _finite(metrics.get(k))]
        return f"its held-out figures are missing or not finite ({', '.join(bad)})" if bad else None
    if not _finite(metrics.get("val_kd")):
        return "it has no finite held-out figures or validation KD to judge it by"
    return None


def held_out_verdict(figures: dict) -> str:
    """`loop_verdict` on the figures of `evaluate.generation_metrics` (named as it names them, without the
    registry's `held_out_` prefix)."""
    return loop_verdict({f"held_out_{k}": v for k, v in figures.items()})


def loop_verdict(metrics: dict) -> str:
    """The gate's verdict on the neuron's own answers: "passes", "may loop" or "loops" ("passes" also when it
    was not judged). Judged with intervals, a neuron passes only when the whole interval of its repetition over
    the teacher's is within the margin: a looping neuron does not pass by luck of the prompts."""
    if _has_intervals(metrics):
        low, high = metrics.get(f"{EXCESS}_low"), metrics.get(f"{EXCESS}_high")
        return "passes" if high <= REPETITION_MARGIN else "loops" if low > REPETITION_MARGIN else "may loop"
    rep, teacher = metrics.get("held_out_repetition"), metrics.get("held_out_teacher_repetition")
    if not _finite(rep) or not _finite(teacher) or rep <= teacher + REPETITION_MARGIN:
        return "passes"
    return "loops"


def loops(metrics: dict) -> str | None:
    """Why the neuron's own answers count as looping (`loop_verdict`), or None."""
    verdict = loop_verdict(metrics)
    if verdict == "passes":
        return None
    if _has_intervals(metrics):
        low, high, excess = (metrics.get(f"{EXCESS}{end}") for end in ("_low", "_high", ""))
        shown = f"{excess:+.3f} " if _finite(excess) else ""
        reason = " (its interval reaches past the bar)" if verdict == "may loop" else ""
        return (f"{verdict}{reason}: its held-out answers repeat {shown}(90% interval {low:+.3f} to {high:+.3f}) of "
                f"their 4-grams beyond the teacher's answers; allowed: + {REPETITION_MARGIN}")
    rep, teacher = metrics["held_out_repetition"], metrics["held_out_teacher_repetition"]
    return (f"loops: {rep:.2f} of the 4-grams of its held-out answers are repeats, the teacher's answers "
            f"{teacher:.2f} (allowed: + {REPETITION_MARGIN})")


def worse_than(new: dict, old: dict) -> str | None:
    """What makes `new` worse than `old`. Both judged with intervals: a figure whose interval lies wholly on the
    worse side of the other's (noise never refuses a version). Judged on held-out prompts without: a figure
    worse beyond `TOLERANCE`. Else the validation KD loss. `new` has usable figures (`unusable_figures`);
    where `old`'s cannot be compared, `new` is not worse."""
    if _has_intervals(new) and _has_intervals(old) and all(_finite(old.get(k)) for k in _interval_keys()):
        problems = []
        for k, better in INTERVALS.items():
            clearly = new[f"{k}_low"] > old[f"{k}_high"] if better == "lower" else new[f"{k}_high"] < old[f"{k}_low"]
            if clearly:
                problems.append(f"{k.removeprefix('held_out_')} {new[k]:.3f} ({new[f'{k}_low']:.3f}-{new[f'{k}_high']:.3f}) "
                                f"against {old[k]:.3f} ({old[f'{k}_low']:.3f}-{old[f'{k}_high']:.3f})")
        return "; ".join(problems) or None
    if all(_finite(new.get(k)) and _finite(old.get(k)) for k in TOLERANCE):
        problems = []
        if new["held_out_kl"] > old["held_out_kl"] + TOLERANCE["held_out_kl"]:
            problems.append(f"held-out KL {new['held_out_kl']:.4f} > {old['held_out_kl']:.4f}")
        if new["held_out_agreement"] < old["held_out_agreement"] - TOLERANCE["held_out_agreement"]:
            problems.append(f"agreement {new['held_out_agreement']:.3f} < {old['held_out_agreement']:.3f}")
        if new["held_out_repetition"] > old["held_out_repetition"] + TOLERANCE["held_out_repetition"]:
            problems.append(f"repetition {new['held_out_repetition']:.3f} > {old['held_out_repetition']:.3f}")
        return "; ".join(problems) or None
    new_kd, old_kd = new.get("val_kd"), old.get("val_kd")
    if not _finite(old_kd):
        return None
    if not _finite(new_kd):
        return "no held-out figures or validation KD comparable with the active version's"
    return f"validation KD {new_kd:.4f} > {old_kd:.4f}" if new_kd > old_kd else None


# ------------------------------------------------------------------------------- shape validation


def same_model(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two model ids name the same model: equal ids, or ids that resolve to the same folder."""
    if str(a) == str(b):
        return True
    from conch_dna.models import model_path

    try:
        pa, pb = model_path(str(a)), model_path(str(b))
    except Exception:  # an id that cannot be resolved here is only equal to itself
        return False
    return pa is not None and pb is not None and Path(pa).resolve() == Path(pb).resolve()



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
        named = self._read_manifest().base_model
        if named is not None and self.base_model is not None and not same_model(named, self.base_model):
            raise RegistryError(f"the registry at {self.root} holds adapters of the base model {named!r}, not "
                                f"{self.base_model!r}: a registry serves one base. Use another --registry for this "
                                "student, or the registry's own base")
        self.base_model = self.base_model or named

    def check_writable(self) -> None:
        """Refuse, before any work, a registry this process cannot write (a read-only file system, no permission)."""
        try:
            check_writable(self.root)
        except OSError as e:
            raise RegistryError(f"cannot write to the registry folder {self.root} ({e.strerror}); choose another "
                                "with --registry, or train with --no-register") from e

    def version_dir(self, v: NeuronVersion) -> Path:
        """The folder of version `v`: always `<root>/<neuron>/v<NNNN>`, a real folder inside the registry."""
        from conch_dna.neuron import check_name

        check_name(v.neuron, "neuron")
        folder = self.root / v.neuron / f"v{v.version:04d}"
        if folder.is_symlink() or not folder.is_dir() or not folder.resolve().is_relative_to(self.root.resolve()):
            raise AdapterMismatchError(f"version {v.version} of neuron {v.neuron!r} has no folder {folder} in the registry: "
                                       f"it was moved or deleted; promote another version of {v.neuron!r}")
        return folder

    def verify(self, v: NeuronVersion) -> Path:
        """Check every file of version `v` against the sha256 recorded when it was registered; its folder."""
        folder = self.version_dir(v)
        expected = v.files or {"adapters.safetensors": v.sha256}  # versions registered before all files were hashed
        for name, digest in expected.items():
            path = folder / name
            try:
                mode = os.lstat(path).st_mode
            except OSError:
                mode = 0
            if Path(name).name != name or not stat.S_ISREG(mode) or sha256_file(path) != digest:
                raise AdapterMismatchError(f"{path} is missing, not a regular file, or does not match its registered "
                                           f"sha256: version {v.version} of {v.neuron!r} was modified after it was "
                                           f"registered; promote another version of {v.neuron!r}")
        return folder

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
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return Manifest(base_model=self.base_model)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MANIFEST_MAX_BYTES:
            raise RegistryError(f"registry manifest {path} is not a regular file of at most {MANIFEST_MAX_BYTES >> 20} MB "
                                "(a link, a device or something else); the registry kept its previous state. Move it away")
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
                # Manifest temporaries exist only while a writer holds this lock: any seen now was left by a kill.
                for stale in self.root.glob(f".{MANIFEST}.*.json"):
                    stale.unlink(missing_ok=True)
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
        from conch_dna.neuron import check_name

        check_name(neuron, "neuron")
        adapter_dir = Path(adapter_dir)
        if student is not None and self.base_model is not None and not same_model(student, self.base_model):
            raise AdapterMismatchError(f"{adapter_dir} was trained on the student {student!r}, but the registry at "
                                       f"{self.root} serves the base {self.base_model!r}; use another --registry")
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
                files = {name: sha256_file(tmp / name) for name in ADAPTER_FILES}
            version = NeuronVersion(neuron=neuron, version=number, path=f"{neuron}/{dest.name}", sha256=digest,
                                    files=files, metrics=dict(metrics or {}), created=datetime.now(UTC).isoformat(),
                                    teacher=teacher, student=student)
            rec = rec.model_copy(update={"versions": rec.versions + (version,)})
            active = False
            if activate:
                refusal = self._gate_refusal(rec, version)
                if refusal is None:
                    rec = rec.model_copy(update={"active": number, "history": (rec.history + (number,))[-HISTORY_LIMIT:]})
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
        if (unusable := unusable_figures(candidate.metrics)) is not None:
            return f"version {candidate.version} cannot be judged: {unusable}"
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
            if rec.active == version:
                return target  # already active: the history is not touched, so a rollback still goes back
            self.verify(target)
            check_adapter(self.version_dir(target), self._shapes())
            if (refusal := self._gate_refusal(rec, target)) is not None:
                raise QualityGateError(f"not promoting {neuron} v{version}: {refusal}")
            history = (rec.history + (version,))[-HISTORY_LIMIT:]
            neurons[neuron] = rec.model_copy(update={"active": version, "history": history})
        return target

    def rollback(self, neuron: str) -> NeuronVersion:
        """Re-activate the version that was active before the current one."""
        with self._transaction() as neurons:
            rec = neurons.get(neuron)
            history = list(rec.history) if rec is not None else []
            while history and history[-1] == rec.active:  # the current one, however often it was activated
                history.pop()
            if not history:
                raise RegistryError(f"neuron {neuron!r} has no earlier active version to roll back to")
            history = tuple(history)
            neurons[neuron] = rec.model_copy(update={"active": history[-1], "history": history})
            previous = history[-1]
        return self.get(neuron, previous)
