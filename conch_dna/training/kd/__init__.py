"""True knowledge distillation from the EGO teacher into CORTEX neurons (LoRA students).

Data flows one way: teacher answers (`examples`, `teacher_cache`) -> targets (`targets`) -> trainer
(`trainer`, using `losses` and `fused`) -> adapter (`checkpoints`) -> registry. `TrueKnowledgeDistiller`
(`distiller`) runs that flow per domain.

The public names below are imported on first use: importing one module of this package (the signals, for
the registry) loads that module alone, never the trainer.
"""

from collections.abc import Mapping
from importlib import import_module

# Public name -> the module that holds it.
_PUBLIC = {
    **dict.fromkeys(("KDConfig", "ConfigError"), "conch_dna.training.kd.config"),
    "DataError": "conch_dna.neuron",
    **dict.fromkeys(("CrossTokenizerError", "align_vocab_sizes", "build_vocab_map", "compare_tokenizers"),
                    "conch_dna.training.kd.cross_vocab"),
    **dict.fromkeys(("KDResult", "OutputDirError", "TrueKnowledgeDistiller"), "conch_dna.training.kd.distiller"),
    **dict.fromkeys(("load_domains", "load_prompts"), "conch_dna.training.kd.domains"),
    **dict.fromkeys(("DIVERGENCES", "SparseTargets", "compute_ce_loss", "compute_kd_loss", "kd_objective", "masked_mean",
                     "next_token_view", "token_divergence", "topk_targets"), "conch_dna.training.kd.losses"),
    **dict.fromkeys(("TrainingCancelled", "TrainingDivergedError"), "conch_dna.training.kd.trainer"),
    **dict.fromkeys(("VocabMismatchError", "check_same_tokenizer"), "conch_dna.training.kd.vocab"),
}


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_PUBLIC])


class _DomainPrompts(Mapping):
    """{domain: prompts} from the domains file in use (`domains.domains_file`), read on first use."""

    def _data(self):
        from conch_dna.training.kd.domains import load_domains

        return load_domains()

    def __getitem__(self, key):
        return self._data()[key]

    def __iter__(self):
        return iter(self._data())

    def __len__(self):
        return len(self._data())


DOMAIN_PROMPTS = _DomainPrompts()

__all__ = ["DOMAIN_PROMPTS", *sorted(_PUBLIC)]
