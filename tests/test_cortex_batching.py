"""CORTEX serves many neurons in one batch: every answer is the one its neuron gives alone, requests keep their
version, adapters stay within their memory budget, and sampling, stop strings and streaming behave."""

import threading
import time

import mlx.core as mx
import pytest

from conch_dna.cortex import Cortex, NeuronRegistry
from conch_dna.cortex.adapters import AdapterSlots
from conch_dna.cortex.cortex import PromptTooLongError
from conch_dna.models import load_model
from conch_dna.neuron import add_lora_layers, chat_prompt_ids
from tests.conftest import random_adapter

QUESTIONS = ["plan a small task", "why is the sky blue", "count to ten please", "debug this loop now",
             "remember the facts", "what is the next action to take here"]
# Adapters unlike each other: ranks, layers and the linear layers they adapt differ (the stacks pad them).
SHAPES = {"thinking": dict(rank=4), "task": dict(rank=8, num_layers=1), "action": dict(rank=2, keys=["self_attn.q_proj", "mlp.down_proj"])}


@pytest.fixture(scope="module")
def neurons(tiny_pair, tmp_path_factory):
    _, student = tiny_pair
    root = tmp_path_factory.mktemp("cortex")
    registry = NeuronRegistry(root / "registry", base_model=student)
    for seed, (name, shape) in enumerate(SHAPES.items()):
        registry.register(name, random_adapter(student, root / name, seed=seed, **shape))
    return registry, student


def alone(student, registry, neuron, question, max_tokens):
    """The neuron's greedy answer the classic way: mlx-lm's LoRA layers on a fresh base, mlx-lm's generate."""
    import json

    from mlx_lm import generate

    model, tokenizer = load_model(str(student))
    if neuron is not None:
        folder = registry.verify(registry.active(neuron))
        config = json.loads((folder / "adapter_config.json").read_text())
        add_lora_layers(model, config["num_layers"], config["lora_parameters"])
        model.load_weights(str(folder / "adapters.safetensors"), strict=False)
    return generate(model, tokenizer, chat_prompt_ids(tokenizer, question), max_tokens=max_tokens)


def test_batched_answers_equal_each_neuron_alone(neurons):
    registry, student = neurons
    cortex = Cortex(registry, str(student), max_batch=16)
    jobs = [(neuron, q) for q in QUESTIONS for neuron in [*SHAPES, None]]
    answers = [None] * len(jobs)

    def ask(i, neuron, q):
        answers[i] = cortex.generate(neuron, q, max_tokens=12)

    threads = [threading.Thread(target=ask, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    expected = {}
    for (neuron, q), answer in zip(jobs, answers):
        assert answer.neuron == (neuron or str(student))
        assert answer.version == (None if neuron is None else 1)
        expected[neuron, q] = alone(student, registry, neuron, q, 12)
        assert answer.text == expected[neuron, q], (neuron, q)
    # the neurons really answer differently from each other and from the base
    for q in QUESTIONS[:2]:
        assert len({expected[n, q] for n in [*SHAPES, None]}) >= 3
    cortex.close()


def test_streaming_and_stop_strings(neurons):
    registry, student = neurons
    with Cortex(registry, str(student)) as cortex:
        full = cortex.generate("thinking", QUESTIONS[0], max_tokens=16)
        assert full.finish_reason == "length" and full.completion_tokens == 16
        stream = cortex.stream("thinking", QUESTIONS[0], max_tokens=16)
        pieces = list(stream)
        assert "".join(pieces) == full.text and len(pieces) > 1 and stream.finish_reason == "length"
        stop = full.text[len(full.text) // 2:][:3]
        cut = cortex.generate("thinking", QUESTIONS[0], max_tokens=16, stop=[stop])
        assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"
        assert cortex.generate("thinking", QUESTIONS[0], max_tokens=300, ignore_eos=True).completion_tokens == 300
        # closing a stream early frees its slot in the batch
        early = cortex.stream("task", QUESTIONS[1], max_tokens=2000)
        next(iter(early))
        early.close()
        deadline = time.monotonic() + 10
        while cortex.engine.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cortex.engine.in_flight == 0


def test_sampling_settings_are_per_request(neurons):
    registry, student = neurons
    with Cortex(registry, str(student)) as cortex:
        greedy = {cortex.generate("thinking", QUESTIONS[2], max_tokens=12).text for _ in range(2)}
        mx.random.seed(0)
        hot = {cortex.generate("thinking", QUESTIONS[2], max_tokens=12, temperature=5.0).text for _ in range(4)}
    assert len(greedy) == 1 and len(hot) > 1


def test_bad_requests_are_refused_before_any_work(neurons):
    registry, student = neurons
    with Cortex(registry, str(student)) as cortex:
        with pytest.raises(PromptTooLongError, match="context is"):
            cortex.generate("thinking", list(range(1, 10)), max_tokens=cortex.context_length)
        with pytest.raises(ValueError, match="max_tokens"):
            cortex.generate("thinking", "hi", max_tokens=0)
        with pytest.raises(ValueError, match="empty"):
            cortex.generate("thinking", "")
        assert cortex.engine.in_flight == 0


def test_a_request_keeps_its_version_and_the_next_gets_the_new_one(neurons, tmp_path):
    registry, student = neurons
    with Cortex(registry, str(student)) as cortex:
        v1 = cortex.generate("thinking", QUESTIONS[3], max_tokens=10)
        long = cortex.stream("thinking", QUESTIONS[3], max_tokens=40)
        first = next(iter(long))
        new = registry.register("thinking", random_adapter(student, tmp_path / "t2", seed=9))
        after = cortex.generate("thinking", QUESTIONS[3], max_tokens=10)
        rest = first + "".join(long)
        assert long.version == 1 and after.version == new.version == 2
        assert rest.startswith(v1.text) and after.text == alone(student, registry, "thinking", QUESTIONS[3], 10)
        registry.rollback("thinking")
        assert cortex.generate("thinking", QUESTIONS[3], max_tokens=10) == v1


def test_adapters_stay_within_the_memory_budget(neurons):
    """Least recently used adapters no request is using are evicted; one in use never is."""
    registry, student = neurons
    model, _ = load_model(str(student))
    thinking, task, action = (registry.active(n) for n in SHAPES)
    size = {v.neuron: sum(w.nbytes for w in mx.load(str(registry.verify(v) / "adapters.safetensors")).values())
            for v in (thinking, task, action)}
    slots = AdapterSlots(model, registry.verify, budget_bytes=size["thinking"] + max(size["task"], size["action"]))
    first = slots.acquire(thinking)
    slots.acquire(task)
    slots.release(task)
    assert slots.acquire(action) is not None  # evicts the idle task, not thinking (in use)
    assert [k[0] for k in slots.loaded] == ["thinking", "action"] and slots.loaded["thinking", 1].slot == first
    assert slots.acquire(task) is None  # both loaded adapters are in use: wait
    slots.release(action)
    assert slots.acquire(task) is not None and [k[0] for k in slots.loaded] == ["thinking", "task"]
    assert slots.nbytes <= slots.budget_bytes


@pytest.mark.real_model
def test_batched_answers_equal_alone_on_the_default_student(default_pair, tmp_path):
    """The offline default student (4-bit, 30 blocks) with three neurons of different shapes, batched."""
    _, student = default_pair
    registry = NeuronRegistry(tmp_path / "registry", base_model=student)
    shapes = {"thinking": dict(rank=8, num_layers=30), "debug": dict(rank=4, num_layers=12),
              "memory": dict(rank=16, num_layers=30, keys=["self_attn.q_proj", "self_attn.v_proj"])}
    for seed, (name, shape) in enumerate(shapes.items()):
        registry.register(name, random_adapter(student, tmp_path / name, seed=seed, scale=0.2, **shape))
    questions = ["What is the capital of France?", "Write a haiku about rain."]
    jobs = [(n, q) for q in questions for n in [*shapes, None]]
    with Cortex(registry, str(student)) as cortex:
        streams = [cortex.stream(n, q, max_tokens=16) for n, q in jobs]  # all in one batch
        answers = [s.text() for s in streams]
    for (neuron, q), text in zip(jobs, answers):
        assert text == alone(student, registry, neuron, q, 16), (neuron, q)
    assert len(set(answers[:4])) >= 3  # the neurons answer differently


def test_an_adapter_that_does_not_fit_the_base_is_refused(neurons, tmp_path):
    """Read back from the registry, an adapter is checked against the base before any row uses it."""
    import json

    from conch_dna.cortex.registry import AdapterMismatchError, NeuronVersion

    registry, student = neurons
    model, _ = load_model(str(student))
    slots = AdapterSlots(model, lambda v: tmp_path / v.neuron)
    for name, key, shape in (("norm", "model.layers.0.input_layernorm", (32, 4)), ("wide", "model.layers.0.self_attn.q_proj", (48, 4))):
        (tmp_path / name).mkdir()
        mx.save_safetensors(str(tmp_path / name / "adapters.safetensors"),
                            {f"{key}.lora_a": mx.zeros(shape), f"{key}.lora_b": mx.zeros((4, 32))})
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"lora_parameters": {"rank": 4, "scale": 1.0}}))
    version = dict(version=1, path="x", sha256="0", created="now")
    with pytest.raises(AdapterMismatchError, match="no linear layer"):
        slots.acquire(NeuronVersion(neuron="norm", **version))
    with pytest.raises(AdapterMismatchError, match="trained on another base"):
        slots.acquire(NeuronVersion(neuron="wide", **version))
    assert not slots.loaded and not slots.layers  # nothing half-loaded
