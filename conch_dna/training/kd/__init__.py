"""True knowledge distillation from the EGO teacher into CORTEX neurons (LoRA students).

Data flows one way: teacher -> targets/cache (`data`) -> trainer (`trainer`, using `losses`) -> adapter ->
registry. `TrueKnowledgeDistiller` (`distiller`) runs that flow per domain.
"""

from collections.abc import Mapping

from conch_dna.training.kd.config import ConfigError, KDConfig
from conch_dna.training.kd.cross_vocab import (
    CrossTokenizerError,
    align_vocab_sizes,
    build_vocab_map,
    compare_tokenizers,
)
from conch_dna.training.kd.data import DataError, load_domains, load_prompts
from conch_dna.training.kd.distiller import KDResult, OutputDirError, TrueKnowledgeDistiller
from conch_dna.training.kd.losses import (
    DIVERGENCES,
    SparseTargets,
    compute_ce_loss,
    compute_kd_loss,
    kd_objective,
    masked_mean,
    next_token_view,
    token_divergence,
    topk_targets,
)
from conch_dna.training.kd.trainer import TrainingCancelled, TrainingDivergedError
from conch_dna.training.kd.vocab import VocabMismatchError, check_same_tokenizer


class _DomainPrompts(Mapping):
    """{domain: prompts} from config/domains.toml, read on first use (never at import)."""

    def _data(self):
        return load_domains()

    def __getitem__(self, key):
        return self._data()[key]

    def __iter__(self):
        return iter(self._data())

    def __len__(self):
        return len(self._data())


DOMAIN_PROMPTS = _DomainPrompts()


def bad_input_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean "the user's input is wrong" (the CLI exits 2 with the message)."""
    from pydantic import ValidationError

    from conch_dna.atomic import WriteError
    from conch_dna.cortex.registry import RegistryError
    from conch_dna.models import ChatTemplateError, ModelNotFoundError
    from conch_dna.models.gguf_convert import GGUFError
    from conch_dna.training.kd.memory import MemoryPreflightError
    from conch_dna.training.kd.trainer import CheckpointError

    return (ConfigError, DataError, OutputDirError, VocabMismatchError, ModelNotFoundError, GGUFError,
            TrainingDivergedError, ValidationError, RegistryError, MemoryPreflightError, CheckpointError, WriteError,
            ChatTemplateError)


__all__ = [
    "DIVERGENCES", "DOMAIN_PROMPTS", "ConfigError", "DataError", "KDConfig", "KDResult", "OutputDirError",
    "CrossTokenizerError", "SparseTargets", "TrainingCancelled", "TrainingDivergedError", "TrueKnowledgeDistiller", "VocabMismatchError",
    "align_vocab_sizes", "bad_input_errors", "build_vocab_map", "check_same_tokenizer", "compare_tokenizers", "compute_ce_loss", "compute_kd_loss",
    "kd_objective", "load_domains", "load_prompts", "masked_mean", "next_token_view", "token_divergence", "topk_targets",
]
