"""EGO: the large model that thinks, and the live teacher of CORTEX's neurons.

EGO owns one loaded model + tokenizer. `chat` answers prompts; `self_distill(domain)` distils EGO into a
CORTEX neuron in a background thread and returns a `DistillationHandle` at once. The model is shared by
the two threads through one re-entrant lock, held for one generation (chat) or one teacher batch
(distillation) at a time: EGO keeps answering while it distils, at worst waiting for one batch. With the
default online targets the teacher also scores every training batch (one forward pass under the lock per
micro-batch); with cached targets it is only needed to write the data.

With an experience store (`experience.py`), `chat(prompt, domain=...)` records every answer EGO serves,
and `self_distill(domain)` learns from exactly those: the domain's stored experience (deduplicated, a fixed
held-out split) mixed with its built-in prompts, reusing the stored answers as teacher responses when this
same model wrote them. `distill_when(domain, every=N)` starts that in the background whenever N new
experiences have arrived (one run per domain at a time, debounced).

On success the adapter is registered in the CORTEX registry (and served by the next CORTEX request of any
process); on failure or cancel nothing is registered and `distillation_failed` is signalled.
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Literal

import mlx.core as mx
import structlog

from conch_dna.ego.experience import ExperienceStore, ExperienceStoreError, distillation_data
from conch_dna.models import load_model
from conch_dna.neuron import chat_prompt_ids, check_name
from conch_dna.training.kd import signals
from conch_dna.training.kd.config import KDConfig
from conch_dna.training.kd.distiller import KDResult, TrueKnowledgeDistiller, register_result
from conch_dna.training.kd.teacher_cache import fingerprint_model
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
        self._thread: threading.Thread | None = None

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
        """Block until the run ends or `timeout` seconds pass; True if it ended. "Ended" means its thread is
        gone too (nothing of it is still running MLX work when a program exits after `wait`)."""
        if not self._done.wait(timeout):
            return False
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        return True

    def _on_step(self, sender, **kw) -> None:  # receivers of the run's distiller's signals
        self.progress = {**self.progress, "step": kw["step"], "iters": kw["iters"], "kd": kw["kd"], "ce": kw["ce"],
                         "loss": kw["loss"]}

    def _on_validation(self, sender, **kw) -> None:
        self.progress = {**self.progress, "val_kd": kw["val_kd"], "val_agreement": kw["val_agreement"]}

    def _finish(self, status: Status, **kw) -> None:
        for k, v in kw.items():
            setattr(self, k, v)
        self.status = status

    def __repr__(self) -> str:
        return f"<DistillationHandle {self.domain} {self.status} {self.progress}>"


class EGO:
    """The large model that thinks (`model_id`, or a live `model` and `tokenizer`): it answers, records what it
    answers, and distils itself into CORTEX neurons in the background."""

    def __init__(self, model_id: str = "default-teacher", *, model=None, tokenizer=None, cortex=None,
                 registry=None, config: KDConfig | None = None, experience: ExperienceStore | str | None = None):
        """`experience`: an `ExperienceStore` (or its database path) where `chat` records what EGO answers
        and from which `self_distill` learns."""
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model and tokenizer (a live model), or neither")
        self.model_id = model_id
        self._model, self._tokenizer = model, tokenizer
        self._fingerprint: str | None = None
        self.cortex = cortex
        self.registry = registry if registry is not None else (cortex.registry if cortex is not None else None)
        self.config = config
        self.experience = ExperienceStore(experience) if isinstance(experience, str | os.PathLike) else experience
        self.lock = threading.RLock()  # serialises use of the model between EGO's threads
        self._runs: dict[str, DistillationHandle] = {}
        self._runs_lock = threading.Lock()
        self._triggers: dict[str, dict] = {}  # domain -> {"every", "min_interval_s", "after" (last id used), "started"}
        self.unrecorded = 0  # answers the experience store could not record (disk full, read-only storage)

    @property
    def model(self):
        """The teacher model, loaded on first use."""
        with self.lock:
            if self._model is None:
                self._model, self._tokenizer = load_model(self.model_id)
            return self._model

    @property
    def tokenizer(self):
        """The teacher's tokenizer, loaded with the model."""
        _ = self.model
        return self._tokenizer

    @property
    def fingerprint(self) -> str:
        """The model's content fingerprint (recorded with every answer: answers of this same model are reused
        as teacher responses, no regeneration)."""
        with self.lock:
            if self._fingerprint is None:
                self._fingerprint = fingerprint_model(self.model)
            return self._fingerprint

    def chat(self, prompt: str, max_tokens: int = 256, system_prompt: str | None = None, domain: str | None = None) -> str:
        """EGO's own (greedy) answer to `prompt`. With an experience store it is recorded (under `domain`, or
        untagged for `experience.tag` later), and may start a self-distillation (`distill_when`)."""
        from mlx_lm import stream_generate

        with self.lock:
            ids = chat_prompt_ids(self.tokenizer, prompt, system_prompt)
            out = list(stream_generate(self.model, self.tokenizer, ids, max_tokens=max_tokens))
        text = "".join(r.text for r in out)
        if self.experience is not None:
            # Every token it produced, EOS included when it stopped (students learn to stop).
            try:
                self.experience.record(domain, prompt, text, model=self.fingerprint, answer_ids=[r.token for r in out])
            except ExperienceStoreError as e:  # the caller still gets its answer; the loss is logged and counted
                self.unrecorded += 1
                log.warning("answer not recorded", error=str(e), unrecorded=self.unrecorded)
                return text
            if domain in self._triggers:
                self._maybe_distill(domain)
        return text

    def distill_when(self, domain: str, every: int, min_interval_s: float = 60.0) -> None:
        """Self-distil `domain` in the background whenever `every` new experiences of it have arrived since
        the last run, at most one run at a time per domain and one start per `min_interval_s` seconds."""
        if self.experience is None:
            raise ValueError("distill_when needs an experience store: EGO(..., experience=path)")
        if every < 1 or min_interval_s < 0:
            raise ValueError(f"every must be >= 1 and min_interval_s >= 0 (got {every}, {min_interval_s})")
        check_name(domain)
        self._triggers[domain] = {"every": every, "min_interval_s": min_interval_s, "after": 0, "started": -math.inf}

    def _maybe_distill(self, domain: str) -> DistillationHandle | None:
        t = self._triggers[domain]
        with self._runs_lock:
            running = self._runs.get(domain)
            if running is not None and not running.done:
                return None
            if time.monotonic() - t["started"] < t["min_interval_s"]:
                return None
        if self.experience.count(domain, after=t["after"]) < t["every"]:
            return None
        t["started"] = time.monotonic()
        t["after"] = max((e.id for e in self.experience.records(domain, after=t["after"])), default=t["after"])
        log.info("experience trigger: self-distilling", domain=domain, every=t["every"])
        return self.self_distill(domain)

    def self_distill(self, domain: str, prompts: list[str] | None = None, config: KDConfig | None = None) -> DistillationHandle:
        """Distil EGO into `domain`'s neuron in the background; returns at once.

        The data: `prompts` if given, else the domain's prompts (config/domains.toml) when it has some, plus,
        with an experience store, the domain's stored experience (deduplicated; its answers reused when this
        model wrote them). The neuron is judged on the domain's held-out prompts plus the experience's fixed
        held-out split. The student is the base model its registry serves, unless the config names one
        (a registry refuses adapters of another base). One run per domain at a time: asking again while one
        is active returns its handle.
        """
        with self._runs_lock:
            running = self._runs.get(domain)
            if running is not None and not running.done:
                return running
            handle = DistillationHandle(domain)
            self._runs[domain] = handle
        base = config or self.config or KDConfig.load()
        changes = {"teacher_model_id": self.model_id}
        served = getattr(self.registry, "base_model", None)
        if served is not None and "student_model_id" not in base.model_fields_set:
            changes["student_model_id"] = served  # the neuron is trained on the base its registry serves
        cfg = base.updated(**changes)
        data = self._training_data(domain, prompts)
        handle._thread = threading.Thread(target=self._run, args=(handle, domain, data, cfg), name=f"self-distill-{domain}",
                                          daemon=True)
        handle._thread.start()
        return handle

    def _training_data(self, domain: str, prompts: list[str] | None) -> dict:
        """prompts (to answer), answered (prompt, answer ids: this model's stored answers), held_out."""
        fingerprint = self.fingerprint if self.experience is not None else None
        return distillation_data(self.experience, domain, fingerprint, prompts)

    def _run(self, handle: DistillationHandle, domain: str, data: dict, cfg: KDConfig) -> None:
        handle.status = "running"
        try:
            self._distill(handle, domain, data, cfg)
        except BaseException as e:  # a bug: still end the handle, never leave a waiter hanging
            handle._finish("failed", error=e)
            raise
        finally:
            # MLX keeps per-thread streams (the teacher prefetch's among them); destroyed here, in their thread,
            # not at interpreter exit, where that can abort the process (ml-explore/mlx#3126).
            mx.synchronize()
            mx.clear_streams()
            handle._done.set()  # last: wait() returns once nothing of the run is left to do

    def _distill(self, handle: DistillationHandle, domain: str, data: dict, cfg: KDConfig) -> None:
        t0 = time.perf_counter()
        try:
            distiller = TrueKnowledgeDistiller(config=cfg, teacher=self.model, teacher_tokenizer=self.tokenizer,
                                               teacher_lock=self.lock)
            # The handle's progress comes from this run's signals (sender: its distiller), like any receiver's.
            with signals.step_completed.connected_to(handle._on_step, sender=distiller), \
                    signals.validation_completed.connected_to(handle._on_validation, sender=distiller):
                result = distiller.distill_domain(domain, data["prompts"], answered=data["answered"],
                                                  held_out=data["held_out"], should_stop=handle._cancel.is_set)
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
                version, _ = register_result(self.registry, domain, result)
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
