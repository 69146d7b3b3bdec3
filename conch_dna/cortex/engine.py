"""Continuous batching of requests for many neurons on one base model, in one thread.

mlx-lm's `BatchGenerator` does the batching: requests join and leave between decode steps. Each request's
prompt cache ends with a `SlotCache` naming its adapter slot, so the row order mlx-lm keeps for the KV caches
(through every merge, filter, extend and split) is the row order of the slots too; `RoutedModel` reads them
before each forward pass and the `MultiLoRALinear` layers apply each row's adapter. All MLX work (forward
passes, loading adapters) happens on the engine's thread; callers only wait on their request's queue.
"""

from __future__ import annotations

import atexit
import gc
import queue
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field

import mlx.core as mx
import structlog

from conch_dna.cortex.adapters import BASE_SLOT, AdapterSlots, RowSlots
from conch_dna.cortex.registry import NeuronVersion

log = structlog.get_logger(__name__)


def _no_stop():
    from mlx_lm.generate import StopSequences

    return StopSequences(None)


class SlotCache:
    """Not a KV cache: the adapter slot of each row, carried in a request's cache list so that mlx-lm's batching
    keeps it in step with the rows' KV caches."""

    def __init__(self, slots: list[int]):
        self.slots = slots

    state = property(lambda self: [])  # nothing for mlx-lm to evaluate
    nbytes = property(lambda self: 0)

    @classmethod
    def merge(cls, caches):
        return cls([s for c in caches for s in c.slots])

    def filter(self, keep):
        self.slots = [self.slots[i] for i in keep]

    def extend(self, other):
        self.slots = self.slots + other.slots

    def extract(self, idx):
        return SlotCache([self.slots[idx]])

    def prepare(self, **_):
        pass

    def finalize(self):
        pass

    def empty(self):
        return not self.slots


class RoutedModel:
    """The base model as `BatchGenerator` calls it: the last cache entry says which adapter each row uses."""

    def __init__(self, model, rows: RowSlots):
        self.model, self.rows = model, rows

    def __call__(self, inputs, cache):
        slots = cache[-1].slots
        if all(s == slots[0] for s in slots):
            self.rows.single, self.rows.slots = slots[0], None
        else:
            self.rows.single, self.rows.slots = None, mx.array(slots, dtype=mx.int32)
        return self.model(inputs, cache=cache[:-1])


@dataclass(eq=False)
class Request:
    """One request: its prompt ids, the neuron version it keeps to its last token (None: the bare base), how it
    samples, and the queue its text arrives on: (text, finish_reason) items, then None; or an exception."""

    ids: list[int]
    version: NeuronVersion | None
    max_tokens: int
    sampler: object
    detokenizer: object
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    completion_tokens: int = 0
    slot: int | None = None
    ignore_eos: bool = False  # decode all max_tokens (benchmarks): the end token does not stop it


class Engine:
    """Runs every request submitted to it in one continuous batch on its own thread."""

    def __init__(self, model, tokenizer, verify, *, max_batch: int = 32, adapter_budget_bytes: int = 256 << 20):
        from mlx_lm.models.cache import make_prompt_cache

        self.model, self.tokenizer = model, tokenizer
        self.slots = AdapterSlots(model, verify, budget_bytes=adapter_budget_bytes)
        self.max_batch = max_batch
        self._make_cache = lambda: make_prompt_cache(model)
        self._incoming: queue.Queue = queue.Queue()
        self._waiting: deque[Request] = deque()
        self._running: dict[int, Request] = {}
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._stop = False

    @property
    def in_flight(self) -> int:
        """Requests submitted and not finished: waiting, processing their prompt or decoding."""
        return self._incoming.qsize() + len(self._waiting) + len(self._running)

    def submit(self, request: Request) -> Request:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop = False
                self._thread = threading.Thread(target=self._run, name="cortex-engine", daemon=True)
                self._thread.start()
                atexit.register(_close, weakref.ref(self))
            self._incoming.put(request)
        return request

    def close(self) -> None:
        """Fail what is waiting or decoding, free the batch and end the thread (a later request starts it)."""
        with self._start_lock:
            self._stop = True
            self._incoming.put(None)
            if self._thread is not None:
                self._thread.join(30)

    # ------------------------------------------------------------------------------- the engine thread

    def _run(self) -> None:
        try:
            self._serve(mx.default_stream(mx.default_device()))  # this thread's own, as mlx_lm.server does
        finally:
            # MLX asks every thread to destroy its streams before it ends (else the process can abort at exit).
            mx.clear_streams()

    def _serve(self, stream) -> None:
        generator = self._new_generator(stream)
        while not self._stop:
            self._take_incoming(block=not self._running and not self._waiting)
            self._drop_cancelled(generator)
            self._admit(generator)
            if not self._running:
                continue
            try:
                _, responses = generator.next()
            except Exception as e:  # noqa: BLE001 - every request in the batch is told, the engine goes on
                log.exception("batch step failed", requests=len(self._running))
                for request in list(self._running.values()):
                    self._finish(request, e)
                self._running.clear()
                generator = self._new_generator(stream)
                continue
            for r in responses:
                self._deliver(self._running[r.uid], r)
                if r.finish_reason is not None:
                    self._finish(self._running.pop(r.uid))
        for request in [*self._waiting, *self._running.values()]:
            self._finish(request, RuntimeError("CORTEX was closed before the request finished"))
        self._waiting.clear()
        self._running.clear()
        # The batch's caches live on this thread's stream: free them here, as mlx_lm.server does.
        del generator
        gc.collect()

    def _new_generator(self, stream):
        from mlx_lm.generate import BatchGenerator

        eos = sorted(getattr(self.tokenizer, "eos_token_ids", None) or [])
        return BatchGenerator(RoutedModel(self.model, self.slots.rows), stop_tokens=[[e] for e in eos],
                              completion_batch_size=self.max_batch, prefill_batch_size=min(8, self.max_batch),
                              stream=stream)

    def _take_incoming(self, block: bool) -> None:
        try:
            item = self._incoming.get(timeout=0.5) if block else self._incoming.get_nowait()
            while item is not None:
                self._waiting.append(item)
                item = self._incoming.get_nowait()
        except queue.Empty:
            pass

    def _drop_cancelled(self, generator) -> None:
        gone = [uid for uid, r in self._running.items() if r.cancelled.is_set()]
        if gone:
            generator.remove(gone)
            for uid in gone:
                self._finish(self._running.pop(uid))
        for request in [r for r in self._waiting if r.cancelled.is_set()]:
            self._waiting.remove(request)
            request.events.put(None)

    def _admit(self, generator) -> None:
        """Start waiting requests, oldest first, while their adapters fit the memory budget."""
        while self._waiting and len(self._running) < self.max_batch:
            request = self._waiting[0]
            try:
                slot = BASE_SLOT if request.version is None else self.slots.acquire(request.version)
            except Exception as e:  # noqa: BLE001 - a broken version fails its own requests, not the engine
                self._waiting.popleft()
                request.events.put(e)
                continue
            if slot is None:
                return  # the budget is full of adapters in use: wait for a request to finish
            self._waiting.popleft()
            request.slot = slot
            (uid,) = generator.insert([request.ids], [request.max_tokens], caches=[[*self._make_cache(), SlotCache([slot])]],
                                      samplers=[request.sampler], stop_sequences=[_no_stop()] if request.ignore_eos else None)
            self._running[uid] = request

    def _deliver(self, request: Request, r) -> None:
        detok = request.detokenizer
        if r.finish_reason != "stop":  # the end token itself is not part of the answer
            detok.add_token(r.token)
            request.completion_tokens += 1
        if r.finish_reason is not None:
            detok.finalize()
        request.events.put((detok.last_segment, r.finish_reason))

    def _finish(self, request: Request, error: Exception | None = None) -> None:
        if request.version is not None and request.slot is not None:
            self.slots.release(request.version)
            request.slot = None
        request.events.put(error)  # None: the end of the answer


def _close(engine_ref) -> None:
    """At exit: end an engine's thread while the interpreter can still run it, so it destroys its streams."""
    engine = engine_ref()
    if engine is not None:
        engine.close()
