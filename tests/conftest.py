import os

import pytest

import conch_dna  # noqa: F401  (optimized BLAS before mlx)
from conch_dna.models.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """A 4-block teacher and a narrower 2-block student sharing one real BPE tokenizer (random weights)."""
    root = tmp_path_factory.mktemp("tiny")
    teacher = build_tiny_model(root / "teacher", num_layers=4, hidden_size=64, seed=0)
    student = build_tiny_model(root / "student", num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1,
                               intermediate_size=64, seed=1, tokenizer_from=teacher)
    return teacher, student


@pytest.fixture(scope="session")
def default_pair():
    """The real offline SmolLM2 teacher and its pruned student (prepared once into the cache dir)."""
    from conch_dna.models.defaults import prepare_default_models

    return prepare_default_models(os.environ.get("CONCH_CACHE_DIR"))


@pytest.fixture
def kd_config(tmp_path):
    from conch_dna.training.kd import KDConfig

    def make(**kw):
        base = dict(iters=6, batch_size=2, val_interval=3, checkpoint_interval=3, output_dir=str(tmp_path / "out"),
                    max_seq_length=64, learning_rate=5e-3, generation={"max_new_tokens": 12, "batch_size": 4})
        base.update(kw)
        return KDConfig(**base)

    return make


def cli_config(batch_size: int, iters: int, gen_batch: int) -> str:
    """A small kd.toml for CLI runs in subprocesses: greedy teacher (deterministic data), short sequences."""
    return (f"batch_size = {batch_size}\niters = {iters}\nval_interval = 4\ncheckpoint_interval = 2\n"
            "max_seq_length = 64\nlearning_rate = 0.005\n"
            f"[generation]\nmax_new_tokens = 10\ntemperature = 0.0\nbatch_size = {gen_batch}\n")


PROMPTS = ["think step by step about apples", "plan a small task", "what is the next action", "reflect on the work",
           "debug this loop", "remember the facts", "why is the sky blue", "count to ten"]


@pytest.fixture(autouse=True)
def isolated_kd_settings(monkeypatch, tmp_path_factory):
    """Tests never read the developer's config/kd.toml or CONCH_KD_* variables unless they set them."""
    import conch_dna.training.kd.config as config_module

    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_FILE", tmp_path_factory.getbasetemp() / "no-kd.toml")
    for key in list(os.environ):
        if key.startswith("CONCH_KD_"):
            monkeypatch.delenv(key)
    yield
    import structlog

    structlog.reset_defaults()  # the CLI tests configure logging, as entry points do


def random_adapter(student, dest, *, seed: int, rank: int = 4, num_layers: int = 2, keys=None, scale: float = 10.0):
    """An mlx-lm LoRA adapter folder for `student` with random A and B (a neuron that answers unlike the base)."""
    from conch_dna.models.tiny import build_random_adapter

    return build_random_adapter(student, dest, seed=seed, rank=rank, num_layers=num_layers, keys=keys, scale=scale)
