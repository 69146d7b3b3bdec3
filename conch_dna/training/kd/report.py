"""Where a training run's news goes: one `Reporter` per run, called once per event.

The trainer reports typed events (`Step`, `Validation`, `Checkpoint`) and nothing else; the distiller
reports the run's start, its teacher data and its end through the same reporter. The reporter writes each
training event as a row of metrics.jsonl, logs it (structlog) and sends its blinker signal (`signals.py`)
with the field names of the event, unchanged: a `Step`'s `loss` is the signal's `loss` and the metrics
row's `loss`. Only the writer process of a data-parallel run reports (the trainer checks once).

Progress bars are receivers of these signals, drawn by entry points (`conch_dna/progress.py`), as logging
is configured by entry points: the library draws nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import structlog
from blinker import Signal

from conch_dna.atomic import atomic_write
from conch_dna.training.kd import signals

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Step:
    """One optimizer step finished. Losses are means over the step's response tokens."""

    step: int  # 1-based
    iters: int
    loss: float  # alpha * kd + (1 - alpha) * ce + unlikelihood * ul
    kd: float
    ce: float  # over the response tokens that are no loop (no_repeat_teacher skips CE on those)
    ul: float  # unlikelihood of the tokens that repeat a 4-gram of their answer (0 when off)
    lr: float
    grad_norm: float  # before clipping
    tokens_per_second: float
    peak_memory_gb: float
    tokens: int  # response tokens seen so far


@dataclass(frozen=True)
class Validation:
    """Validation figures at `step` (0: the untrained student), from `validation.evaluate`."""

    step: int
    figures: dict = field(default_factory=dict)  # val_kd, val_ce, val_loss, val_agreement, val_tokens (+ cross)


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: str


Event = Step | Validation | Checkpoint


class Reporter:
    """One run's reporting path: metrics.jsonl + log + signals. `context` (domain, run_id) goes into every
    signal; `sender` is the signals' sender (the distiller; None for a bare trainer run). A reporter that is
    not `enabled` (a data-parallel helper process) reports nothing."""

    def __init__(self, metrics_path: Path | None, sender=None, log_every: int = 1, enabled: bool = True, **context):
        self.metrics_path, self.sender, self.context = metrics_path, sender, context
        self.log_every, self.enabled = max(1, log_every), enabled

    # ------------------------------------------------------------------------------ trainer events

    def __call__(self, event: Event) -> None:
        if not self.enabled:
            return
        if isinstance(event, Step):
            row = asdict(event)
            self._append({"type": "train", **row})
            if event.step % self.log_every == 0 or event.step == event.iters:
                log.info("step", **{k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()})
            self.signal(signals.step_completed, **row)
        elif isinstance(event, Validation):
            self._append({"type": "val", "step": event.step, **event.figures})
            log.info("validation", step=event.step,
                     **{k: round(v, 5) if isinstance(v, float) else v for k, v in event.figures.items()})
            self.signal(signals.validation_completed, step=event.step, **event.figures)
        elif isinstance(event, Checkpoint):
            log.debug("checkpoint saved", step=event.step, path=event.path)
            self.signal(signals.checkpoint_saved, step=event.step, path=event.path)
        else:
            raise TypeError(f"not a training event: {event!r}")

    def resumed(self, step: int) -> None:
        """Keep the loss curve consistent after a resume: drop metrics rows written after `step`."""
        path = self.metrics_path
        if path is None or not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if line.strip() and json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
        atomic_write(path, lambda p: p.write_text("".join(k + "\n" for k in kept)))

    # ------------------------------------------------------------------------------ run events

    def signal(self, signal: Signal, **payload) -> None:
        """Send `signal` with this run's context; the payload is built by the caller only when someone listens
        (see `wants`)."""
        if self.enabled:
            signals.send(signal, self.sender, **self.context, **payload)

    @staticmethod
    def wants(signal: Signal) -> bool:
        return signals.has_receivers(signal)

    def _append(self, row: dict) -> None:
        if self.metrics_path is not None:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")


def quiet(event: Event) -> None:
    """The reporter of a process that does not report (data-parallel helpers)."""


__all__ = ["Checkpoint", "Event", "Reporter", "Step", "Validation", "quiet"]
