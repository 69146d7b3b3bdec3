"""CORTEX: small specialised neurons (one base student + one LoRA adapter per domain) and their registry."""

from conch_dna.cortex.cortex import AnswerStream, Cortex, NeuronAnswer, PromptTooLongError, Sampling
from conch_dna.cortex.registry import (
    AdapterMismatchError,
    DuplicateAdapterError,
    NeuronNotFoundError,
    NeuronRegistry,
    NeuronVersion,
    QualityGateError,
    RegistryError,
)

DEFAULT_REGISTRY_DIR = "models/cortex_registry"

__all__ = [
    "DEFAULT_REGISTRY_DIR", "AdapterMismatchError", "AnswerStream", "Cortex", "PromptTooLongError", "Sampling", "DuplicateAdapterError", "NeuronAnswer",
    "NeuronNotFoundError", "NeuronRegistry", "NeuronVersion", "QualityGateError", "RegistryError",
]
