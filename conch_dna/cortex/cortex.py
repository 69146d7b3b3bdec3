"""CORTEX: one base student in memory, any neuron served by attaching that neuron's active adapter.

`generate(domain, prompt)` first notices a registry manifest changed by any process (`registry.refresh`:
one stat per request, no polling thread), reads the active version once, then attaches that version's LoRA
weights to the shared base model (switching adapters never reloads the base) and answers. Requests are
serialised on the base model by a lock, so a request in flight finishes on the version it started with; a
version registered, promoted or rolled back meanwhile, here or in another process, is used by the next
request, with no restart. Versions are complete before the manifest names them (the registry copies the
adapter first), so a request never sees a half-registered version.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import mlx.core as mx
import structlog

from conch_dna.cortex.registry import (
    NeuronNotFoundError,
    NeuronRegistry,
    NeuronVersion,
    RegistryError,
    same_model,
)
from conch_dna.models import load_model
from conch_dna.neuron import add_lora_layers, chat_prompt_ids

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class NeuronAnswer:
    text: str
    neuron: str
    version: int


class Cortex:
    """Serves the registry's active neurons on one shared base model loaded once (`base_model_id`, or a live
    `model` and `tokenizer`): each request attaches its neuron's adapter, sha256-checked when first loaded."""

    def __init__(self, registry: NeuronRegistry, base_model_id: str | None = None, *, model=None, tokenizer=None):
        self.registry = registry
        served = registry.base_model  # the base its manifest names, or the one it was opened for
        if base_model_id is not None and served is not None and not same_model(base_model_id, served):
            raise RegistryError(f"the registry at {registry.root} holds adapters of {served!r}, not {base_model_id!r}: "
                                "serve it on its own base (leave base_model_id out)")
        self.base_model_id = base_model_id or served or "default-student"
        if model is None:
            model, tokenizer = load_model(self.base_model_id)
        self.model, self.tokenizer = model, tokenizer
        self._lock = threading.Lock()
        self._attached: NeuronVersion | None = None
        self._lora_layout: str | None = None  # the LoRA wrapping currently on the base model
        self._weights: dict[tuple[str, int], tuple[dict, list]] = {}  # (config, tensors) by (neuron, version), verified once

    def _load_version(self, v: NeuronVersion) -> tuple[dict, list]:
        key = (v.neuron, v.version)
        if key not in self._weights:
            folder = self.registry.verify(v)  # every file against its registered sha256, inside the registry
            config = json.loads((folder / "adapter_config.json").read_text())
            self._weights[key] = (config, list(mx.load(str(folder / "adapters.safetensors")).items()))
        return self._weights[key]

    def _attach(self, v: NeuronVersion) -> None:
        """Put `v`'s LoRA weights on the base model (called with the lock held)."""
        from mlx_lm.tuner.utils import remove_lora_layers

        if self._attached == v:
            return
        config, weights = self._load_version(v)
        layout = json.dumps([config.get("num_layers"), config.get("lora_parameters")], sort_keys=True)
        if layout != self._lora_layout:
            remove_lora_layers(self.model)
            add_lora_layers(self.model, config["num_layers"], config["lora_parameters"])  # as training computed
            self._lora_layout = layout
        self.model.load_weights(weights, strict=False)
        mx.eval(self.model.parameters())
        self.model.eval()
        self._attached = v
        log.debug("neuron attached", neuron=v.neuron, version=v.version)

    def generate(self, domain: str, prompt: str, max_tokens: int = 128, system_prompt: str | None = None) -> NeuronAnswer:
        """Answer `prompt` with the domain's active neuron (greedy)."""
        from mlx_lm import generate


        self.registry.refresh()  # another process may have registered, promoted or rolled back
        version = self.registry.active(domain)  # fixed for this request
        if version is None:
            raise NeuronNotFoundError(f"neuron {domain!r} has no active version; distil it first (known: {', '.join(self.registry.neurons()) or 'none'})")
        ids = chat_prompt_ids(self.tokenizer, prompt, system_prompt)
        with self._lock:
            self._attach(version)
            text = generate(self.model, self.tokenizer, ids, max_tokens=max_tokens)
        return NeuronAnswer(text, domain, version.version)
