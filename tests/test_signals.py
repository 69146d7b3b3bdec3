"""Every signal's order and payload, for a successful, a failing and a cancelled run."""

import json

import pytest

from conch_dna.training.kd import TrainingCancelled, TrueKnowledgeDistiller, signals
from tests.conftest import PROMPTS


def record_all():
    """Connect one receiver per signal (scoped); yields the list of (signal name, sender, kwargs)."""
    from contextlib import ExitStack

    events = []
    stack = ExitStack()
    for sig in signals.ALL_SIGNALS:
        def receiver(sender, _name=sig.name, **kw):
            events.append((_name, sender, kw))
        stack.enter_context(sig.connected_to(receiver))
    return stack, events


def names(events):
    return [e[0] for e in events]


def test_successful_run_order_and_payloads(tiny_pair, kd_config):
    teacher, student = tiny_pair
    cfg = kd_config(iters=4, val_interval=2, checkpoint_interval=2)
    d = TrueKnowledgeDistiller(str(teacher), str(student), cfg)
    stack, events = record_all()
    with stack:
        result = d.distill_domain("thinking", PROMPTS)
    seq = names(events)
    assert seq == ["distillation-started", "teacher-progress", "teacher-progress", "teacher-data-ready", "validation-completed",
                   "step-completed", "step-completed", "validation-completed", "checkpoint-saved",
                   "step-completed", "step-completed", "validation-completed", "checkpoint-saved", "domain-completed"]
    assert all(sender is d for _, sender, _ in events)
    run_ids = {kw["run_id"] for _, _, kw in events}
    assert run_ids == {result.run_id}
    started = events[0][2]
    assert started["domain"] == "thinking" and started["config"]["iters"] == 4 and started["prompts"] == len(PROMPTS)
    progress = [events[1][2], events[2][2]]  # 8 prompts answered in batches of 4
    assert [(p["done"], p["total"]) for p in progress] == [(4, len(PROMPTS)), (8, len(PROMPTS))]
    ready = events[3][2]
    assert ready["samples"] == len(PROMPTS) and ready["tokens"] > 0 and ready["seconds"] >= 0 and ready["cached"] is False
    steps = [kw for n, _, kw in events if n == "step-completed"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    for s in steps:
        assert set(s) >= {"step", "iters", "kd", "ce", "ul", "loss", "lr", "grad_norm", "tokens_per_second", "peak_memory_gb"}
        loss = cfg.alpha * s["kd"] + (1 - cfg.alpha) * s["ce"] + cfg.unlikelihood * s["ul"]
        assert s["loss"] == pytest.approx(loss, rel=1e-5)
    vals = [kw for n, _, kw in events if n == "validation-completed"]
    assert [v["step"] for v in vals] == [0, 2, 4] and all(0 <= v["val_agreement"] <= 1 for v in vals)
    ckpts = [kw for n, _, kw in events if n == "checkpoint-saved"]
    assert [c["step"] for c in ckpts] == [2, 4] and all(c["path"].endswith(f"checkpoint_{c['step']:06d}") for c in ckpts)
    done = events[-1][2]
    assert done["result"]["domain"] == "thinking" and done["adapter_path"] == result.adapter_path
    for _, _, kw in events:  # payloads are plain Python values
        json.dumps(kw)


def test_failing_run_signals_failure_with_last_checkpoint(tiny_pair, kd_config, monkeypatch):
    from conch_dna.training.kd import trainer

    teacher, student = tiny_pair
    cfg = kd_config(iters=6, checkpoint_interval=2)
    calls = {"n": 0}
    real = trainer.make_update

    def exploding_update(*args):
        update = real(*args)

        def exploding(*step_args):
            calls["n"] += 1
            if calls["n"] == 3:
                raise MemoryError("simulated out of memory in step 3")
            return update(*step_args)

        return exploding

    monkeypatch.setattr(trainer, "make_update", exploding_update)
    stack, events = record_all()
    with stack, pytest.raises(MemoryError):
        TrueKnowledgeDistiller(str(teacher), str(student), cfg).distill_domain("debug", PROMPTS)
    seq = names(events)
    assert seq[-1] == "distillation-failed" and "domain-completed" not in seq
    assert seq.count("step-completed") == 2
    failed = events[-1][2]
    assert failed["error_type"] == "MemoryError" and "step 3" in failed["error"] and failed["cancelled"] is False
    assert failed["last_checkpoint"].endswith("checkpoint_000002")


def test_cancelled_run(tiny_pair, kd_config):
    teacher, student = tiny_pair
    stack, events = record_all()
    count = {"steps": 0}

    def stop():
        return count["steps"] >= 1

    def on_step(sender, **kw):
        count["steps"] += 1

    with stack, signals.step_completed.connected_to(on_step), pytest.raises(TrainingCancelled):
        TrueKnowledgeDistiller(str(teacher), str(student), kd_config()).distill_domain("task", PROMPTS, should_stop=stop)
    seq = names(events)
    assert seq[-1] == "distillation-failed" and seq.count("step-completed") == 1
    assert events[-1][2]["cancelled"] is True and events[-1][2]["error_type"] == "TrainingCancelled"


def test_a_receiver_that_raises_does_not_kill_the_run(tiny_pair, kd_config):
    from structlog.testing import capture_logs

    teacher, student = tiny_pair

    def broken(sender, **kw):
        raise RuntimeError("dashboard bug")

    with signals.step_completed.connected_to(broken), capture_logs() as logs:
        result = TrueKnowledgeDistiller(str(teacher), str(student), kd_config(iters=2)).distill_domain("memory", PROMPTS)
    assert result.iterations == 2
    failures = [entry for entry in logs if entry["event"] == "signal receiver failed"]
    assert len(failures) == 2 and failures[0]["signal"] == "step-completed"


def test_nothing_is_done_for_a_signal_nobody_listens_to():
    from blinker import Signal

    lonely = Signal("lonely")

    def fail(*a, **k):
        raise AssertionError("receivers were looked up although nobody listens")

    lonely.receivers_for = fail
    signals.send(lonely, object(), step=1)  # returns at once
    assert not signals.has_receivers(lonely)
    lonely.connect(lambda sender, **kw: None, weak=False)
    assert signals.has_receivers(lonely)


def test_every_signal_is_documented():
    for sig in signals.ALL_SIGNALS:
        assert sig.__doc__ and "kwargs" in sig.__doc__, sig.name
