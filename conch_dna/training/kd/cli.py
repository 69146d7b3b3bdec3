"""The `conch-distill` command (also `python -m conch_dna.training.kd` and `scripts/distill_neurons.py`).
Defaults are the offline EGO/CORTEX pair. Bad input exits with code 2 before any model is loaded."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from contextlib import contextmanager

EXIT_BAD_INPUT = 2


# Flags that set one KDConfig field: their help, type, choices, default and range come from the field itself.
CONFIG_FLAGS = {
    "--teacher": "teacher_model_id", "--student": "student_model_id", "--output": "output_dir",
    "--temperature": "temperature", "--alpha": "alpha", "--divergence": "divergence", "--iters": "iters",
    "--batch-size": "batch_size", "--learning-rate": "learning_rate", "--max-seq-length": "max_seq_length",
    "--max-new-tokens": "generation.max_new_tokens", "--lora-rank": "lora.rank", "--lora-init": "lora.init",
    "--seed": "seed", "--on-policy": "on_policy_lambda", "--own-answers": "own_answers",
    "--unlikelihood": "unlikelihood", "--text": "text", "--text-share": "text_share",
    "--memory-limit-gb": "memory_limit_gb", "--memory-budget-gb": "memory_budget_gb",
}


def build_parser(prog: str = "conch-distill") -> argparse.ArgumentParser:
    from conch_dna.training.kd.config import field_info

    ap = argparse.ArgumentParser(
        prog=prog, description="Distil the EGO teacher into CORTEX neuron LoRA adapters (true logit-level KD), "
        "judge each neuron on held-out prompts and register it in the CORTEX registry.",
        epilog="Settings without a flag go in a TOML file (--config) or CONCH_KD_<FIELD> environment variables; "
        "flags rank above both. The domains come from CONCH_KD_DOMAINS_FILE, else config/domains.toml of "
        "the working directory, else the package's defaults.")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--domain", help="one domain to distil (a domain of the domains file, or any name with --prompts)")
    which.add_argument("--all", action="store_true", help="distil every domain of the domains file")
    which.add_argument("--list", action="store_true", help="list the CORTEX registry's neurons and versions, then exit")
    ap.add_argument("--prompts", help="prompt file: one prompt per line, or JSONL with a \"prompt\" field")
    for flag, name in CONFIG_FLAGS.items():
        info = field_info(name)
        ap.add_argument(flag, type=info.type, choices=info.choices, metavar=info.metavar, help=info.help)
    ap.add_argument("--grad-checkpoint", choices=["block", "mlp"],
                    help="recompute the student's blocks (or only their MLPs) in the backward pass: less memory, "
                    "more time (sets grad_checkpoint and grad_checkpoint_scope; default off)")
    ap.add_argument("--from-experience", metavar="DB",
                    help="with --domain: also learn from EGO's experience database (conch_dna.ego.ExperienceStore)")
    ap.add_argument("--config", help="TOML settings file (default: CONCH_KD_CONFIG_FILE, else config/kd.toml of "
                    "the working directory if present)")
    ap.add_argument("--resume", action="store_true", help="resume each domain from its latest checkpoint")
    ap.add_argument("--spread-domains", action="store_true",
                    help="with --all under mlx.launch: deal whole domains out to the processes instead of splitting batches")
    ap.add_argument("--registry", default="models/cortex_registry", help="CORTEX neuron registry folder (default %(default)s)")
    ap.add_argument("--no-register", action="store_true", help="train only; do not register the adapters in CORTEX")
    ap.add_argument("--log-json", action="store_true", help="JSON-lines logs even on a terminal")
    return ap


def overrides_from_args(args) -> dict:
    """CLI flags that were given, as KDConfig fields (flags rank above environment and file)."""
    out: dict = {}
    for flag, name in CONFIG_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            section, _, field = name.rpartition(".")
            (out.setdefault(section, {}) if section else out)[field] = value
    if args.grad_checkpoint is not None:
        out.update(grad_checkpoint=True, grad_checkpoint_scope=args.grad_checkpoint)
    return out


def main(argv: list[str] | None = None, prog: str = "conch-distill") -> int:
    import conch_dna  # noqa: F401  (optimized BLAS before mlx)
    from conch_dna.log_setup import configure_logging

    args = build_parser(prog).parse_args(argv)
    configure_logging(json_lines=True if args.log_json else None)
    if args.list:
        return list_neurons(args.registry)
    if (problem := flag_problem(args)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from conch_dna.training.kd import distributed as dist
    from conch_dna.training.kd.trainer import TrainingCancelled

    stop = StopRequest()
    try:
        with stop.installed():
            results, registered = distil(args, stop)
    except bad_input_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (TrainingCancelled, KeyboardInterrupt) as e:
        print(f"stopped by {stop.name}: {e or 'interrupted'}. Run the same command with --resume to continue.",
              file=sys.stderr)
        return 128 + stop.signum
    if not dist.is_writer():
        return 0  # rank 0 reports for a data-parallel run
    for name, r in results.items():
        v, active = registered.get(name, (None, False))
        print(summary(name, r, v, active), file=sys.stderr)
        print(json.dumps(result_line(name, r, v, active)))
    return 0


def flag_problem(args) -> str | None:
    """What is wrong with a combination of flags, or None."""
    if not args.domain and not args.all:
        return "give --domain NAME or --all (or --list)"
    if args.all and args.from_experience:
        return "--from-experience applies to one --domain (its experience); give --domain NAME"
    if args.all and args.prompts:
        return "--prompts applies to one --domain; --all distils every domain of config/domains.toml with its own prompts"
    return None


def distil(args, stop: StopRequest) -> tuple[dict, dict]:
    """Every input checked before the first expensive step (the teacher's answers), then the run, then the
    registration: (results, {name: (version, active)})."""
    from conch_dna.neuron import check_name
    from conch_dna.progress import ProgressBar
    from conch_dna.training.kd import distributed as dist
    from conch_dna.training.kd.config import KDConfig
    from conch_dna.training.kd.distiller import TrueKnowledgeDistiller
    from conch_dna.training.kd.domains import load_prompts
    from conch_dna.training.kd.memory import bound_gpu_queue, stored_weights_bytes

    if args.domain:
        check_name(args.domain)
    config = KDConfig.load(args.config, **_merge_nested(args))
    # Before a model is loaded: MLX reads the queue's bound when it first uses the GPU.
    bound_gpu_queue(config.memory_budget_gb or config.memory_limit_gb,
                    stored_weights_bytes(config.teacher_model_id, config.student_model_id))
    prompts = load_prompts(args.prompts) if args.prompts else None
    distiller = TrueKnowledgeDistiller(config=config)
    distiller.check_models()
    registry = None if args.no_register or not dist.is_writer() else open_registry(args.registry, config)
    with ProgressBar():
        if args.all:
            results = distiller.distill_all(resume=args.resume, spread=args.spread_domains, should_stop=stop)
        else:
            data = experience_data(args.from_experience, args.domain, prompts, distiller) \
                if args.from_experience else {"prompts": prompts}
            results = {args.domain: distiller.distill_domain(args.domain, resume=args.resume, should_stop=stop, **data)}
    return results, register_results(registry, results) if registry is not None else {}


def result_line(name: str, r, version, active: bool) -> dict:
    """The JSON line the CLI prints per domain."""
    held = {k: round(x, 4) for k, x in (r.held_out or {}).items() if isinstance(x, float)}
    share = (r.cost or {}).get("share_of_teacher_bf16")
    return {"domain": name, "adapter": r.adapter_path, "final_train_loss": round(r.final_train_loss, 4),
            "initial_val_kd": r.initial_val_kd, "final_val_kd": r.final_val_kd, "final_val_ce": r.final_val_ce,
            "val_agreement": r.val_agreement, "held_out": held or None,
            "share_of_teacher_bf16": round(share, 4) if share is not None else None,
            "training_seconds": round(r.training_seconds, 1),
            "registered_version": version.version if version else None, "active": active}


def bad_input_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean "the user's input is wrong" (the CLI exits 2 with the message)."""
    from pydantic import ValidationError

    from conch_dna.atomic import WriteError
    from conch_dna.cortex.registry import RegistryError
    from conch_dna.models import ChatTemplateError, ModelNotFoundError
    from conch_dna.models.gguf_convert import GGUFError
    from conch_dna.neuron import DataError
    from conch_dna.training.kd.checkpoints import CheckpointError
    from conch_dna.training.kd.config import ConfigError
    from conch_dna.training.kd.distiller import OutputDirError
    from conch_dna.training.kd.memory import MemoryPreflightError
    from conch_dna.training.kd.trainer import TrainingDivergedError
    from conch_dna.training.kd.vocab import VocabMismatchError

    return (ConfigError, DataError, OutputDirError, VocabMismatchError, ModelNotFoundError, GGUFError,
            TrainingDivergedError, ValidationError, RegistryError, MemoryPreflightError, CheckpointError, WriteError,
            ChatTemplateError)


def _interval(figures: dict, name: str, fmt: str = ".3f") -> str:
    low, high = figures.get(f"{name}_low"), figures.get(f"{name}_high")
    return f" [{low:{fmt}}, {high:{fmt}}]" if low is not None and high is not None else ""


def summary(name: str, r, version, active: bool) -> str:
    """What a person reads at the end of a run: how the neuron answers held-out prompts, beside the teacher."""
    lines = [f"neuron {name!r}: adapter {r.adapter_path}"]
    if h := r.held_out:
        lines += [f"  held-out prompts: {h['prompts']} (its own greedy answers, {r.config['eval_max_new_tokens']} tokens; "
                  "90% intervals over prompts in brackets)",
                  f"  KL(teacher||neuron) {h['kl']:.3f}{_interval(h, 'kl')}   top-1 agreement {h['agreement']:.3f}"
                  f"{_interval(h, 'agreement')}",
                  f"  repeated 4-grams {h['repetition']:.3f}{_interval(h, 'repetition')} (teacher {h['teacher_repetition']:.3f}"
                  + (f"; the neuron's excess {h['repetition_excess']:+.3f}{_interval(h, 'repetition_excess', '+.3f')}"
                     if "repetition_excess" in h else "") + ")",
                  f"  teacher NLL of its answers {h['teacher_nll']:.3f}   ends with EOS {h['eos_rate']:.2f} "
                  f"(teacher {h['teacher_eos_rate']:.2f})"]
        for ex in h.get("examples", [])[:1]:
            lines += [f"  e.g. {ex['prompt']}", f"    neuron:  {ex['neuron'][:160]!r}", f"    teacher: {ex['teacher'][:160]!r}"]
    if (c := r.cost) and c.get("share_of_teacher_bf16") is not None:
        lines.append(f"  weights {(c['student_weight_bytes'] + c['adapter_bytes']) / 1e6:.1f} MB (base + adapter) = "
                     f"{c['share_of_teacher_bf16']:.0%} of the teacher's bf16 {c['teacher_bf16_bytes'] / 1e6:.1f} MB")
    if version is not None:
        lines.append(f"  registered as version {version.version}, " + ("active" if active else "NOT active (quality gate: see the log)"))
    return "\n".join(lines)


class StopRequest:
    """SIGINT / SIGTERM ask for a clean stop: the run stops at the next step (or batch of teacher answers),
    saving a checkpoint to resume from, and the CLI exits 128 + the signal (130, 143). A second signal
    stops at once (KeyboardInterrupt). Called as `should_stop()`."""

    def __init__(self):
        self.signum, self._requested = signal.SIGINT, False

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def __call__(self) -> bool:
        return self._requested

    @contextmanager
    def installed(self):
        self._requested = False
        if threading.current_thread() is not threading.main_thread():  # signal handlers: main thread only
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self._requested:
            raise KeyboardInterrupt
        self._requested, self.signum = True, signum
        print(f"\n{signal.Signals(signum).name}: stopping at the next step and saving a checkpoint "
              "(send it again to stop at once)", file=sys.stderr)


def experience_data(db: str, domain: str, prompts: list[str] | None, distiller) -> dict:
    """distill_domain's data from EGO's experience database: the domain's prompts (or --prompts) plus its
    stored experience; answers the teacher itself wrote are reused (same fingerprint)."""
    from pathlib import Path

    from conch_dna.ego.experience import ExperienceStore, ExperienceStoreError, distillation_data
    from conch_dna.neuron import DataError

    if not Path(db).is_file():
        raise DataError(f"experience database {db} does not exist; give the path EGO(..., experience=...) writes")
    try:
        store = ExperienceStore(db, read_only=True)  # training only reads: read-only storage is fine
        if not store.count(domain):
            raise DataError(f"{db} holds no experience for domain {domain!r} (known there: {', '.join(store.domains()) or 'none'})")
        return distillation_data(store, domain, distiller.teacher_fingerprint, prompts)
    except ExperienceStoreError as e:
        raise DataError(str(e)) from e


def open_registry(registry_dir: str, config):
    """The CORTEX registry the run will register into, opened (and its manifest validated) before any work."""
    from conch_dna.cortex import NeuronRegistry

    registry = NeuronRegistry(registry_dir, base_model=config.student_model_id, quality_gate=True)
    registry.check_writable()
    return registry


def register_results(registry, results: dict) -> dict:
    """Register each trained adapter as the next version of its neuron in the CORTEX registry, behind the
    quality gate; {name: (version, whether it is active)}."""
    from conch_dna.training.kd.distiller import register_result

    registry.reload()  # another process may have registered while this one trained
    return {name: register_result(registry, name, r) for name, r in results.items()}


def list_neurons(registry_dir: str) -> int:
    from conch_dna.cortex import NeuronRegistry, RegistryError

    try:
        registry = NeuronRegistry(registry_dir)
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not registry.neurons():
        print(f"no neurons registered in {registry_dir}")
    for name in registry.neurons():
        active = registry.active(name)
        for v in registry.versions(name):
            mark = "*" if active is not None and v.version == active.version else " "
            kd = v.metrics.get("val_kd")
            print(f"{mark} {name:12s} v{v.version:<4d} val_kd={kd if kd is None else round(kd, 4)!s:8s} {v.created}  {registry.root / v.path}")
    return 0


def _merge_nested(args) -> dict:
    """Nested flags (lora.rank, generation.max_new_tokens) must not wipe the rest of their section."""
    from conch_dna.training.kd.config import KDConfig

    over = overrides_from_args(args)
    if "lora" in over or "generation" in over:
        base = KDConfig.load(args.config, **{k: v for k, v in over.items() if k not in ("lora", "generation")})
        for section in ("lora", "generation"):
            if section in over:
                over[section] = {**getattr(base, section).model_dump(), **over[section]}
    return over


if __name__ == "__main__":
    sys.exit(main())
