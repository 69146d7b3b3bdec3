"""EGO: the large thinking model, and the live teacher for self-distillation into CORTEX neurons."""

from conch_dna.ego.ego import EGO, DistillationHandle
from conch_dna.ego.experience import Experience, ExperienceStore, ExperienceStoreError

__all__ = ["EGO", "DistillationHandle", "Experience", "ExperienceStore", "ExperienceStoreError"]
