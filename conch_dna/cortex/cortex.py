"""CORTEX: one base student in memory serving every neuron at once.

A request names a neuron (or the bare base). Its version is fixed when it is submitted: the registry manifest
is checked for changes by any process first (`registry.refresh`: one stat, no polling thread), so a version
registered, promoted or rolled back anywhere is used from the next request on, and a request in flight keeps
the version it started with to its last token. Requests from any number of threads share one continuous batch
(`engine.Engine`), each row decoding with its own neuron's adapter (`adapters.MultiLoRALinear`); adapters are
sha256-checked when first loaded and kept within a memory budget. Versions are complete before the manifest
names them (the registry copies the adapter first), so a request never sees a half-registered version.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache

import mlx.core as mx
import structlog

from conch_dna.cortex.engine import Engine, Request
from conch_dna.cortex.registry import (
    NeuronNotFoundError,
    NeuronRegistry,
    NeuronVersion,
    RegistryError,
    same_model,
)
from conch_dna.models import load_model
from conch_dna.neuron import chat_ids

log = structlog.get_logger(__name__)


class PromptTooLongError(ValueError):
    """The prompt and the tokens asked for do not fit the base model's context."""


@dataclass(frozen=True)
class NeuronAnswer:
    text: str
    neuron: str
    version: int | None  # None: the bare base model answered
    finish_reason: str = "stop"  # "stop" (the end token or a stop string) or "length" (max_tokens)
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Sampling:
    """How a request decodes: at most `max_tokens` tokens, greedy at temperature 0 (else sampled, nucleus
    `top_p`), ending before any `stop` string; `ignore_eos` decodes all `max_tokens` (for benchmarks)."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    ignore_eos: bool = False


@cache
def _sampler(temperature: float, top_p: float):
    """One sampler object per setting, so that a batch sharing one samples all rows in one call."""
    from mlx_lm.sample_utils import make_sampler

    return make_sampler(temp=temperature, top_p=0.0 if top_p >= 1.0 else top_p)


class AnswerStream:
    """The text of one answer as it is decoded: iterate for pieces of text. `finish_reason` and the token counts
    are set when it ends; `close()` (or leaving a `with` block) stops decoding and frees the request's slot."""

    def __init__(self, request: Request, neuron: str, stop: Sequence[str]):
        self.request, self.neuron, self.stop = request, neuron, [s for s in stop if s]
        self.version = request.version.version if request.version is not None else None
        self.prompt_tokens = len(request.ids)
        self.finish_reason: str | None = None
        self._held = ""  # text that may be the start of a stop string, not yet given out

    @property
    def completion_tokens(self) -> int:
        """Tokens of the answer decoded so far (the end token not counted)."""
        return self.request.completion_tokens

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        """The next piece of the answer's text (never empty); StopIteration when it has ended."""
        while self.finish_reason is None:
            event = self.request.events.get()
            if isinstance(event, Exception):
                self.close()
                raise event
            if event is None:  # cancelled before it finished
                self.close()
                break
            text, reason = event
            piece = self._release(text, final=reason is not None)
            if self.finish_reason is None and reason is not None:
                self.finish_reason = reason
            if piece:
                return piece
        self.close()
        raise StopIteration

    def _release(self, text: str, final: bool) -> str:
        """The part of the text so far that is surely the answer's (text that may begin a stop string is held
        back until it is clear); a stop string ends the answer before it."""
        held = self._held + text
        hits = [at for at in (held.find(s) for s in self.stop) if at >= 0]
        if hits:
            self.finish_reason = "stop"
            self.request.cancelled.set()
            self._held = ""
            return held[: min(hits)]
        keep = 0 if final else max((k for s in self.stop for k in range(1, len(s)) if held.endswith(s[:k])), default=0)
        self._held = held[len(held) - keep:]
        return held[: len(held) - keep]

    def close(self) -> None:
        """Stop decoding (if it has not ended) and free the request's place in the batch."""
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
        self.request.cancelled.set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def text(self) -> str:
        """The rest of the answer, waited for."""
        return "".join(self)


class Cortex:
    """Serves the registry's active neurons on one shared base model loaded once (`base_model_id`, or a live
    `model` and `tokenizer`). Thread-safe: concurrent callers share one batch. `max_batch`: requests decoded at
    once; `adapter_memory_mb`: adapters kept loaded (least recently used evicted)."""

    def __init__(self, registry: NeuronRegistry, base_model_id: str | None = None, *, model=None, tokenizer=None,
                 max_batch: int = 32, adapter_memory_mb: int = 256):
        self.registry = registry
        served = registry.base_model  # the base its manifest names, or the one it was opened for
        if base_model_id is not None and served is not None and not same_model(base_model_id, served):
            raise RegistryError(f"the registry at {registry.root} holds adapters of {served!r}, not {base_model_id!r}: "
                                "serve it on its own base (leave base_model_id out)")
        self.base_model_id = base_model_id or served or "default-student"
        if model is None:
            model, tokenizer = load_model(self.base_model_id)
        # Weights still lazy (a dequantized load) belong to this thread's stream, which the engine's cannot use.
        mx.eval(model.parameters())
        self.model, self.tokenizer = model, tokenizer
        self.context_length = context_length(model)
        self.engine = Engine(model, tokenizer, registry.verify, max_batch=max_batch,
                             adapter_budget_bytes=adapter_memory_mb << 20)

    def version_for(self, neuron: str | None) -> NeuronVersion | None:
        """The version a request for `neuron` keeps to its end (None, or the base model's id: the bare base)."""
        if neuron is None or neuron == self.base_model_id:
            return None
        self.registry.refresh()  # another process may have registered, promoted or rolled back
        version = self.registry.active(neuron)
        if version is None:
            known = ", ".join(self.registry.neurons()) or "none"
            raise NeuronNotFoundError(f"neuron {neuron!r} has no active version; distil it first (known: {known})")
        return version

    def stream(self, neuron: str | None, prompt: str | list, *, system_prompt: str | None = None, **sampling) -> AnswerStream:
        """Start answering `prompt` with `neuron`'s active version: a user turn (str), a conversation (list of
        {"role", "content"}) or token ids (list of int, used as they are). `sampling`: the fields of `Sampling`
        (max_tokens, temperature, top_p, stop, ignore_eos)."""
        s = Sampling(**sampling)
        if not prompt:
            raise ValueError("the prompt is empty")
        if s.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {s.max_tokens}")
        if all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            ids = chat_ids(self.tokenizer, ([{"role": "system", "content": system_prompt}] if system_prompt else []) + turns)
        if len(ids) + s.max_tokens > self.context_length:
            raise PromptTooLongError(f"the prompt is {len(ids)} tokens and {s.max_tokens} more were asked for: the base "
                                     f"model's context is {self.context_length} tokens; shorten the prompt or max_tokens")
        version = self.version_for(neuron)
        request = Request(ids, version, s.max_tokens, _sampler(float(s.temperature), float(s.top_p)),
                          self.tokenizer.detokenizer, ignore_eos=s.ignore_eos)
        return AnswerStream(self.engine.submit(request), neuron or self.base_model_id, s.stop)

    def generate(self, domain: str | None, prompt: str | list, max_tokens: int = 128, system_prompt: str | None = None,
                 **sampling) -> NeuronAnswer:
        """Answer `prompt` with the domain's active neuron (greedy unless `temperature` is given)."""
        answer = self.stream(domain, prompt, max_tokens=max_tokens, system_prompt=system_prompt, **sampling)
        text = answer.text()
        return NeuronAnswer(text, answer.neuron, answer.version, answer.finish_reason, answer.prompt_tokens,
                            answer.completion_tokens)

    def close(self) -> None:
        """Stop the engine thread (requests in flight fail); a later request starts it again."""
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def context_length(model) -> int:
    """The longest sequence the base model was trained for (its config's max_position_embeddings)."""
    args = getattr(model, "args", None)
    for name in ("max_position_embeddings", "context_length", "max_seq_len"):
        value = getattr(args, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 16
