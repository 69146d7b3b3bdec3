"""EGO: the large model that thinks, and the live teacher of CORTEX's neurons.

EGO owns one loaded model + tokenizer. `chat` answers prompts; `self_distill(domain)` distils EGO into a
CORTEX neuron in a background thread and returns a `DistillationHandle` at once. The model is shared by
the two threads through one re-entrant lock, held for one generation (chat) or one teacher batch
(distillation) at a time: EGO keeps answering while it distils, at worst waiting for one batch. With the
default online targets the teacher also scores every training batch (one forward pass under the lock per
micro-batch); with cached targets it is only needed to write the data.

On success the adapter is registered in the CORTEX registry (and served by the next CORTEX request); on
failure or cancel nothing is registered and `distillation_failed` is signalled.
"""

from __future__ import annotations

import threading
import time
from typing import Literal

import structlog

from conch_dna.models import load_model
from conch_dna.training.kd import signals
from conch_dna.training.kd.config import KDConfig
from conch_dna.training.kd.data import chat_prompt_ids
from conch_dna.training.kd.distiller import KDResult, TrueKnowledgeDistiller, registry_metrics
from conch_dna.training.kd.trainer import TrainingCancelled

log = structlog.get_logger(__name__)

Status = Literal["pending", "running", "succeeded", "failed", "cancelled"]


class DistillationHandle:
    """The state of one background self-distillation run."""

    def __init__(self, domain: str):
        self.domain = domain
        self.status: Status = "pending"
        self.progress: dict = {"step": 0, "iters": None}
        self.result: KDResult | None = None
        self.version = None  # the registered NeuronVersion, on success
        self.error: BaseException | None = None
        self._cancel = threading.Event()
        self._done = threading.Event()

    def cancel(self) -> None:
        """Ask the run to stop at the next step boundary (nothing is registered)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run ends or `timeout` seconds pass; True if it ended."""
        return self._done.wait(timeout)

    def _on_step(self, sender, **kw) -> None:  # receivers of the run's distiller's signals
        self.progress = {**self.progress, "step": kw["step"], "iters": kw["iters"], "kd": kw["kd"], "ce": kw["ce"],
                         "loss": kw["loss"]}

    def _on_validation(self, sender, **kw) -> None:
        self.progress = {**self.progress, "val_kd": kw["val_kd"], "val_agreement": kw["val_agreement"]}

    def _finish(self, status: Status, **kw) -> None:
        for k, v in kw.items():
            setattr(self, k, v)
        self.status = status
        self._done.set()

    def __repr__(self) -> str:
        return f"<DistillationHandle {self.domain} {self.status} {self.progress}>"


class EGO:
    def __init__(self, model_id: str = "default-teacher", *, model=None, tokenizer=None, cortex=None,
                 registry=None, config: KDConfig | None = None):
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model and tokenizer (a live model), or neither")
        self.model_id = model_id
        self._model, self._tokenizer = model, tokenizer
        self.cortex = cortex
        self.registry = registry if registry is not None else (cortex.registry if cortex is not None else None)
        self.config = config
        self.lock = threading.RLock()  # serialises use of the model between EGO's threads
        self._runs: dict[str, DistillationHandle] = {}
        self._runs_lock = threading.Lock()

    @property
    def model(self):
        with self.lock:
            if self._model is None:
                self._model, self._tokenizer = load_model(self.model_id)
            return self._model

    @property
    def tokenizer(self):
        _ = self.model
        return self._tokenizer

    def chat(self, prompt: str, max_tokens: int = 256, system_prompt: str | None = None) -> str:
        """EGO's own (greedy) answer to `prompt`."""
        from mlx_lm import generate

        with self.lock:
            ids = chat_prompt_ids(self.tokenizer, prompt, system_prompt)
            return generate(self.model, self.tokenizer, ids, max_tokens=max_tokens)

    def self_distill(self, domain: str, prompts: list[str] | None = None, config: KDConfig | None = None) -> DistillationHandle:
        """Distil EGO into `domain`'s neuron in the background; returns at once.

        One run per domain at a time: asking again while a run for `domain` is active returns its handle.
        """
        with self._runs_lock:
            running = self._runs.get(domain)
            if running is not None and not running.done:
                return running
            handle = DistillationHandle(domain)
            self._runs[domain] = handle
        cfg = (config or self.config or KDConfig.load()).model_copy(update={"teacher_model_id": self.model_id})
        thread = threading.Thread(target=self._run, args=(handle, domain, prompts, cfg), name=f"self-distill-{domain}", daemon=True)
        thread.start()
        return handle

    def _run(self, handle: DistillationHandle, domain: str, prompts, cfg: KDConfig) -> None:
        handle.status = "running"
        t0 = time.perf_counter()
        try:
            distiller = TrueKnowledgeDistiller(config=cfg, teacher=self.model, teacher_tokenizer=self.tokenizer,
                                               teacher_lock=self.lock)
            # The handle's progress comes from this run's signals (sender: its distiller), like any receiver's.
            with signals.step_completed.connected_to(handle._on_step, sender=distiller), \
                    signals.validation_completed.connected_to(handle._on_validation, sender=distiller):
                result = distiller.distill_domain(domain, prompts, should_stop=handle._cancel.is_set)
        except TrainingCancelled as e:  # the distiller signalled distillation_failed(cancelled=True)
            handle._finish("cancelled", error=e)
            return
        except Exception as e:  # the distiller signalled distillation_failed
            log.error("self-distillation failed", domain=domain, error=str(e))
            handle._finish("failed", error=e)
            return
        try:
            if handle.cancelled:  # cancelled after the last step: honour it, register nothing
                raise TrainingCancelled("cancelled after training, before registration")
            version = None
            if self.registry is not None:
                version = self.registry.register(
                    domain, result.adapter_path,
                    metrics=registry_metrics(result), exist_ok=True, teacher=cfg.teacher_model_id, student=cfg.student_model_id,
                )
        except Exception as e:  # cancelled late, or the registry refused the adapter: nothing registered
            # The distillation itself completed (domain_completed was sent); not registering it is the handle's
            # news (status, error) and the log's, not a second end signal.
            cancelled = isinstance(e, TrainingCancelled)
            log.error("self-distillation not registered", domain=domain, error=str(e))
            handle._finish("cancelled" if cancelled else "failed", error=e, result=result)
            return
        handle._finish("succeeded", result=result, version=version)
        log.info("self-distillation finished", domain=domain, seconds=round(time.perf_counter() - t0, 1),
                 version=getattr(version, "version", None))
