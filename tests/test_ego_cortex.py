"""EGO self-distillation at runtime and CORTEX hot-swapping, under concurrency."""

import json
import threading
import time

import pytest

from conch_dna.cortex import Cortex, NeuronNotFoundError, NeuronRegistry
from conch_dna.ego import EGO
from conch_dna.models import load_model
from conch_dna.training.kd import KDConfig, signals
from tests.conftest import PROMPTS


def config(tmp_path, **kw):
    base = dict(iters=4, batch_size=2, val_interval=2, checkpoint_interval=2, output_dir=str(tmp_path / "out"),
                max_seq_length=64, learning_rate=2e-2, generation={"max_new_tokens": 10, "batch_size": 4})
    base.update(kw)
    return KDConfig(**base)


@pytest.fixture
def world(tiny_pair, tmp_path):
    teacher, student = tiny_pair
    registry = NeuronRegistry(tmp_path / "registry", base_model=student)
    cortex = Cortex(registry, str(student))
    ego = EGO(str(teacher), cortex=cortex, config=config(tmp_path, student_model_id=str(student)))
    return ego, cortex, registry


def test_self_distill_registers_and_cortex_serves_it(world):
    ego, cortex, registry = world
    with pytest.raises(NeuronNotFoundError, match="no active version"):
        cortex.generate("thinking", "hello")
    handle = ego.self_distill("thinking", PROMPTS)
    assert ego.self_distill("thinking", PROMPTS) is handle  # one run per domain at a time
    assert handle.wait(120) and handle.status == "succeeded", handle.error
    assert handle.version.version == 1 and registry.active("thinking") == handle.version
    assert handle.progress["step"] == 4 and handle.result.iterations == 4
    answer = cortex.generate("thinking", "think about apples", max_tokens=8)
    assert answer.neuron == "thinking" and answer.version == 1 and isinstance(answer.text, str)
    # The neuron's answer is the one its adapter gives on a fresh base with the trainer's own LoRA layers.
    from mlx_lm import generate

    from conch_dna.neuron import add_lora_layers, chat_prompt_ids

    model, tokenizer = load_model(cortex.base_model_id)
    folder = registry.verify(handle.version)
    config = json.loads((folder / "adapter_config.json").read_text())
    add_lora_layers(model, config["num_layers"], config["lora_parameters"])
    model.load_weights(str(folder / "adapters.safetensors"), strict=False)
    assert answer.text == generate(model, tokenizer, chat_prompt_ids(tokenizer, "think about apples"), max_tokens=8)


def test_concurrent_generation_while_ego_self_distils_and_hot_registers(world, tmp_path):
    ego, cortex, registry = world
    first = ego.self_distill("thinking", PROMPTS)
    assert first.wait(120) and first.status == "succeeded"
    errors, answers, ego_answers = [], [], []
    stop = threading.Event()

    def cortex_client():
        while not stop.is_set():
            try:
                started = time.perf_counter()
                a = cortex.generate("thinking", "plan a small task", max_tokens=6)
                answers.append((started, a.version))
            except Exception as e:  # noqa: BLE001 - the test collects every error
                errors.append(e)

    def ego_client():
        while not stop.is_set():
            try:
                ego_answers.append(ego.chat("hello", max_tokens=4))
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    threads = [threading.Thread(target=cortex_client) for _ in range(2)] + [threading.Thread(target=ego_client)]
    for t in threads:
        t.start()
    try:
        second = ego.self_distill("thinking", PROMPTS, config=config(tmp_path, seed=7, student_model_id=ego.config.student_model_id,
                                                                      output_dir=str(tmp_path / "out2")))
        assert second.wait(180) and second.status == "succeeded", second.error
        registered_at = time.perf_counter()
        deadline = time.time() + 30
        while time.time() < deadline and not any(v == 2 and t > registered_at for t, v in answers):
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors[:3]
    versions = [v for _, v in answers]
    assert set(versions) == {1, 2}
    # Every request that started after the registration finished is served by the new version (no restart);
    # a request in flight keeps the version it started with, so completion order may interleave.
    after = [v for started, v in answers if started > registered_at]
    assert after and all(v == 2 for v in after)
    assert ego_answers  # EGO kept answering while it distilled


def test_cancel_registers_nothing_and_signals(world):
    ego, cortex, registry = world
    failed = []

    def on_failed(sender, **kw):
        failed.append(kw)

    started = threading.Event()

    def on_step(sender, **kw):
        started.set()
        time.sleep(0.2)  # slow steps so that cancel lands mid-run

    with signals.distillation_failed.connected_to(on_failed), signals.step_completed.connected_to(on_step):
        handle = ego.self_distill("debug", PROMPTS)
        assert started.wait(120)
        handle.cancel()
        assert handle.wait(120)
    assert handle.status == "cancelled" and handle.version is None
    assert "debug" not in registry.neurons()
    assert failed and failed[-1]["cancelled"] is True and failed[-1]["domain"] == "debug"


def test_failure_registers_nothing(world):
    ego, cortex, registry = world
    handle = ego.self_distill("memory", ["word " * 500])  # longer than max_seq_length
    assert handle.wait(60) and handle.status == "failed"
    assert "does not fit" in str(handle.error) and "memory" not in registry.neurons()
    # a new request after a finished run starts a new run
    again = ego.self_distill("memory", PROMPTS)
    assert again is not handle and again.wait(120) and again.status == "succeeded"


def test_self_distill_twice_on_the_same_data_returns_the_same_version(world):
    """As the CLI does: re-registering the same adapter (same sha256) is a no-op, not a failure."""
    ego, cortex, registry = world
    first = ego.self_distill("thinking", PROMPTS)
    assert first.wait(120) and first.status == "succeeded", first.error
    again = ego.self_distill("thinking", PROMPTS)
    assert again.wait(120) and again.status == "succeeded", again.error
    assert again.version == first.version and len(registry.versions("thinking")) == 1
    assert first.result.held_out is not None and "repetition" in first.result.held_out  # judged like the CLI's
    assert cortex.generate("thinking", "hello", max_tokens=2).version == first.version.version
