"""Blinker signals of the distillation subsystem, in Flask's style.

One private namespace; module-level signals with snake_case names and kebab-case signal names. The
sender is the emitting object (a `TrueKnowledgeDistiller`, or the `NeuronRegistry` for
`adapter_registered`); the payload is keyword arguments of plain Python values (str, int, float, bool,
None, dict, list). Receivers should accept `**extra` so that new keyword arguments never break them.

    from conch_dna.training.kd import signals

    def on_step(sender, **kw):
        print(kw["step"], kw["kd"])

    signals.step_completed.connect(on_step)            # held weakly: keep a reference (or weak=False)
    with signals.step_completed.connected_to(on_step):  # or scoped, as the tests do
        ...

Decision: a receiver that raises must not kill a training run. `send` calls each receiver on its own,
logs the exception of one that fails (structlog event "signal receiver failed", with the signal and
receiver names) and carries on with the others and with the run. This differs from blinker's own
`Signal.send`, which stops at the first exception: a progress bar or a dashboard bug should never cost
hours of training. Payloads are built only when a signal has receivers (`has_receivers`).

Every run emits, in order: distillation_started, teacher_progress per batch of prompts the teacher answers,
teacher_data_ready, then per step step_completed, with validation_completed (step 0 = the untrained
student, then every val_interval) and checkpoint_saved interleaved, and finally exactly one of
domain_completed or distillation_failed; adapter_registered follows domain_completed when the adapter is
registered in CORTEX. The distiller sends them all through its run's `report.Reporter`, the same path that
writes metrics.jsonl and the log.
"""

from __future__ import annotations

import structlog
from blinker import Namespace, Signal

log = structlog.get_logger(__name__)

_signals = Namespace()

distillation_started = _signals.signal("distillation-started", doc="""\
A domain's distillation begins.
kwargs: domain (str), run_id (str), config (dict: KDConfig as JSON values), prompts (int: how many).""")

teacher_data_ready = _signals.signal("teacher-data-ready", doc="""\
The teacher's responses and soft targets exist (generated now, or read from the cache).
kwargs: domain, run_id, samples (int), tokens (int: prompt + response tokens), seconds (float: generation
time), cached (bool).""")

teacher_progress = _signals.signal("teacher-progress", doc="""\
The teacher answered another batch of the domain's prompts (not sent when its answers come from the cache).
kwargs: domain, run_id, done (int: prompts answered so far), total (int: prompts).""")

step_completed = _signals.signal("step-completed", doc="""\
One optimizer step finished (the fields of `report.Step`, the same names as in metrics.jsonl).
kwargs: domain, run_id, step (int, 1-based), iters (int), loss (float: alpha * kd + (1 - alpha) * ce),
kd (float), ce (float), ul (float: unlikelihood of loop tokens), lr (float), grad_norm (float: before clipping), tokens_per_second (float),
peak_memory_gb (float), tokens (int: response tokens seen so far).""")

validation_completed = _signals.signal("validation-completed", doc="""\
Validation on held-out prompts finished (step 0 is the untrained student).
kwargs: domain, run_id, step (int), val_kd, val_ce, val_loss (float), val_agreement (float: teacher-student
top-1 agreement), val_tokens (int).""")

checkpoint_saved = _signals.signal("checkpoint-saved", doc="""\
A checkpoint (adapter + optimizer state + step) was written atomically.
kwargs: domain, run_id, step (int), path (str).""")

domain_completed = _signals.signal("domain-completed", doc="""\
A domain's adapter is trained and saved.
kwargs: domain, run_id, result (dict: KDResult as JSON values), adapter_path (str).""")

distillation_failed = _signals.signal("distillation-failed", doc="""\
A domain's distillation stopped without an adapter (error or cancel). Nothing is registered.
kwargs: domain, run_id, error (str: message), error_type (str: exception class), cancelled (bool),
last_checkpoint (str or None: resume from it with resume=True / --resume).""")

adapter_registered = _signals.signal("adapter-registered", doc="""\
The CORTEX registry recorded a new neuron version. Sender: the NeuronRegistry.
kwargs: neuron (str), version (int), path (str), sha256 (str), active (bool: whether it is now the active
version; false when the quality gate refused it or activation was not asked for).""")

ALL_SIGNALS = (distillation_started, teacher_progress, teacher_data_ready, step_completed, validation_completed, checkpoint_saved,
               domain_completed, distillation_failed, adapter_registered)


def has_receivers(signal: Signal) -> bool:
    """True when someone listens: check before building an expensive payload."""
    return bool(signal.receivers)


def send(signal: Signal, sender, **payload) -> None:
    """Call every receiver of `signal` for `sender`; a receiver that raises is logged, not propagated."""
    if not signal.receivers:
        return
    for receiver in signal.receivers_for(sender):
        try:
            receiver(sender, **payload)
        except Exception:
            log.exception("signal receiver failed", signal=signal.name, receiver=getattr(receiver, "__qualname__", repr(receiver)))
