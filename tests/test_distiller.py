"""The distiller end to end on tiny random-weight models, plus bad input."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load as mlx_load

from conch_dna.models import load_model
from conch_dna.training.kd import (
    DOMAIN_PROMPTS,
    DataError,
    KDResult,
    OutputDirError,
    TrueKnowledgeDistiller,
    signals,
)
from conch_dna.training.kd.examples import Example, split_examples
from conch_dna.training.kd.teacher_cache import TeacherCache
from tests.conftest import PROMPTS


def test_generate_train_save_and_stock_mlx_lm_load(tiny_pair, kd_config):
    teacher, student = tiny_pair
    cfg = kd_config()
    d = TrueKnowledgeDistiller(str(teacher), str(student), cfg)
    r = d.distill_domain("thinking", PROMPTS)
    assert isinstance(r, KDResult)
    out = cfg.output_dir / "thinking"
    for f in ("adapters.safetensors", "adapter_config.json", "metrics.jsonl", "result.json", "checkpoint_000006/state.json"):
        assert (out / f).is_file(), f
    assert json.loads((out / "result.json").read_text())["domain"] == "thinking"
    json.loads(r.model_dump_json())  # serialisable
    assert r.num_train_samples + r.num_val_samples == len(PROMPTS) + r.num_own_answers and r.val_agreement is not None
    assert r.num_own_answers == r.num_train_samples // 2  # the student answered each training prompt (own_answers auto)

    # Logits of the trained student (rebuilt from our adapter) == stock mlx_lm.load(student, adapter_path=...).
    from conch_dna.training.kd.trainer import apply_lora

    ours, _ = load_model(student)
    apply_lora(ours, cfg)
    ours.load_weights(str(out / "adapters.safetensors"), strict=False)
    stock, tok = mlx_load(str(student), adapter_path=str(out))
    x = mx.array([tok.encode("the quick brown fox")])
    logits = lambda m: np.array(m(x).astype(mx.float32))  # noqa: E731
    # float32 on the CPU; on a GPU the models are bf16 (resolution 2^-8 relative) and mlx-lm's LoRA layer
    # promotes its activations to float32
    tol = dict(atol=1e-5) if ours(x).dtype == mx.float32 else dict(rtol=3e-2, atol=6e-2)
    assert np.allclose(logits(ours), logits(stock), **tol)
    # ... and training changed the student.
    base, _ = mlx_load(str(student))
    assert not np.allclose(logits(base), logits(stock), atol=1e-4)


def test_cache_is_reused_and_keyed_by_inputs(tiny_pair, kd_config):
    teacher, student = tiny_pair
    cfg = kd_config(teacher_targets="cache")
    d = TrueKnowledgeDistiller(str(teacher), str(student), cfg)
    c1, s1 = d.generate_training_data(PROMPTS[:4], "task")
    c2, s2 = d.generate_training_data(PROMPTS[:4], "task")
    assert not s1["cached"] and s2["cached"]
    assert [e.tokens for e in c1.examples] == [e.tokens for e in c2.examples]
    _, s3 = d.generate_training_data(PROMPTS[:3], "task")  # changed prompts: never stale
    assert not s3["cached"]
    d2 = TrueKnowledgeDistiller(str(teacher), str(student), cfg.model_copy(update={"top_k": 8}))
    assert not d2.generate_training_data(PROMPTS[:4], "task")[1]["cached"]
    # A different temperature/alpha reuses the same targets.
    d3 = TrueKnowledgeDistiller(str(teacher), str(student), cfg.model_copy(update={"temperature": 4.0, "alpha": 0.2}))
    assert d3.generate_training_data(PROMPTS[:4], "task")[1]["cached"]
    assert len(list((cfg.output_dir / "teacher_cache").iterdir())) == 3
    loaded = TeacherCache.load(next((cfg.output_dir / "teacher_cache").iterdir()))
    assert loaded.targets[0].logits.shape[-1] in (cfg.top_k, 8)
    assert [e.prompt for e in c1.examples] == PROMPTS[:4]  # stored with the answers (re-tokenized across tokenizers)


def test_online_training_stores_answers_only(tiny_pair, kd_config):
    """Online targets come from the live teacher: the cache holds no top-k, and top_k does not key it."""
    teacher, student = tiny_pair
    cfg = kd_config(teacher_targets="online")
    c1, s1 = TrueKnowledgeDistiller(str(teacher), str(student), cfg).generate_training_data(PROMPTS[:4], "task")
    assert not s1["cached"] and c1.targets == [] and "cache_bytes_per_token" not in s1
    d2 = TrueKnowledgeDistiller(str(teacher), str(student), cfg.model_copy(update={"top_k": 8}))
    c2, s2 = d2.generate_training_data(PROMPTS[:4], "task")
    assert s2["cached"] and c2.targets == [] and [e.prompt for e in c2.examples] == PROMPTS[:4]
    assert [e.tokens for e in c2.examples] == [e.tokens for e in c1.examples]


def test_live_teacher_is_not_reloaded(tiny_pair, kd_config, monkeypatch):
    teacher, student = tiny_pair
    model, tok = load_model(teacher)
    d = TrueKnowledgeDistiller(student_model_id=str(student), config=kd_config(iters=2), teacher=model, teacher_tokenizer=tok)
    calls = []
    import conch_dna.training.kd.distiller as dist

    real = dist.load_model
    monkeypatch.setattr(dist, "load_model", lambda p: calls.append(str(p)) or real(p))
    d.distill_domain("memory", PROMPTS[:4])
    assert calls == [str(student)]  # only the student was loaded


def test_online_targets_and_grad_accumulation(tiny_pair, kd_config):
    teacher, student = tiny_pair
    cfg = kd_config(teacher_targets="online", grad_accumulation=2, iters=3, divergence="jsd")
    r = TrueKnowledgeDistiller(str(teacher), str(student), cfg).distill_domain("debug", PROMPTS)
    assert np.isfinite(r.final_train_loss) and r.tokens_processed > 0


def test_distill_all_writes_summary(tiny_pair, kd_config):
    teacher, student = tiny_pair
    cfg = kd_config(iters=2)
    domains = {"alpha": PROMPTS[:3], "beta": PROMPTS[3:6]}
    results = TrueKnowledgeDistiller(str(teacher), str(student), cfg).distill_all(domains)
    summary = json.loads((cfg.output_dir / "kd_summary.json").read_text())
    assert set(summary) == set(results) == {"alpha", "beta"}


def stop_after_steps(d, domain: str, n: int) -> None:
    """Run `d` on `domain` and cancel it once n steps are done (a checkpoint is saved at the step reached)."""
    from conch_dna.training.kd import TrainingCancelled

    steps = []
    with signals.step_completed.connected_to(lambda sender, **kw: steps.append(kw["step"]), sender=d), \
            pytest.raises(TrainingCancelled):
        d.distill_domain(domain, PROMPTS, should_stop=lambda: len(steps) >= n)


@pytest.mark.parametrize("compile_step", ["off", "on"])
def test_resume_continues_from_checkpoint_exactly(tiny_pair, kd_config, tmp_path, compile_step):
    """N steps == k steps, stop, resume, N-k steps: bitwise on CPU (same adapter weights), also with the
    compiled step and update (the resumed optimizer state must reach the compiled update)."""

    teacher, student = tiny_pair
    full = kd_config(iters=6, output_dir=str(tmp_path / "full"), lora={"dropout": 0.1}, warmup_steps=2,
                     compile_step=compile_step)
    TrueKnowledgeDistiller(str(teacher), str(student), full).distill_domain("task", PROMPTS)
    part = full.model_copy(update={"output_dir": tmp_path / "part"})
    stop_after_steps(TrueKnowledgeDistiller(str(teacher), str(student), part), "task", 3)
    # The stop saved a checkpoint at the step reached: the resume starts there.
    assert (tmp_path / "part/task/checkpoint_000003/state.json").is_file()
    assert not (tmp_path / "part/task/adapters.safetensors").exists()
    TrueKnowledgeDistiller(str(teacher), str(student), part).distill_domain("task", PROMPTS, resume=True)
    a = mx.load(str(tmp_path / "full/task/adapters.safetensors"))
    b = mx.load(str(tmp_path / "part/task/adapters.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(np.array(a[k]), np.array(b[k])), k
    curve = [json.loads(x) for x in (tmp_path / "part/task/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_default_domains_are_loaded():
    assert set(DOMAIN_PROMPTS) >= {"thinking", "task", "action", "reflection", "debug", "memory"}
    assert all(len(p) >= 20 for p in DOMAIN_PROMPTS.values())


def test_bad_input(tiny_pair, kd_config, tmp_path):
    teacher, student = tiny_pair
    d = TrueKnowledgeDistiller(str(teacher), str(student), kd_config())
    with pytest.raises(DataError, match="empty|no prompts"):
        d.distill_domain("thinking", [])
    with pytest.raises(DataError, match="unknown domain"):
        d.distill_domain("no-such-domain")
    with pytest.raises(DataError, match="does not fit max_seq_length"):
        d.distill_domain("thinking", ["word " * 200])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    d2 = TrueKnowledgeDistiller(str(teacher), str(student), kd_config(output_dir=str(blocker / "sub")))
    with pytest.raises(OutputDirError, match="not writable"):
        d2.distill_domain("thinking", PROMPTS)
    from conch_dna.models import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="does not exist"):
        TrueKnowledgeDistiller(str(tmp_path / "missing"), str(student), kd_config()).distill_domain("thinking", PROMPTS)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_pair, kd_config, monkeypatch):
    from conch_dna.training.kd import TrainingDivergedError, trainer

    teacher, student = tiny_pair
    cfg = kd_config(iters=6, checkpoint_interval=2, compile_step="off")  # compiled, the loss is traced once
    real = trainer.make_objective
    calls = {"n": 0}

    def poisoned_objective(*args):
        objective = real(*args)

        def poisoned(*a):
            calls["n"] += 1
            loss, out = objective(*a)
            if calls["n"] >= 4:  # the 4th training step's loss becomes NaN
                loss = loss * mx.array(float("nan"))
                out = {**out, "loss": loss}
            return loss, out

        return poisoned

    monkeypatch.setattr(trainer, "make_objective", poisoned_objective)
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: {"val_kd": 0.0, "val_ce": 0.0, "val_loss": 0.0, "val_agreement": 0.0, "val_tokens": 0})
    with pytest.raises(TrainingDivergedError, match="step 4") as e:
        TrueKnowledgeDistiller(str(teacher), str(student), cfg).distill_domain("thinking", PROMPTS)
    assert e.value.last_checkpoint.name == "checkpoint_000002"
    assert not (cfg.output_dir / "thinking" / "adapters.safetensors").exists()  # nothing half-written


@pytest.mark.parametrize("compiled", [False, True])
def test_update_is_skipped_on_the_device_when_the_loss_is_not_finite(compiled):
    """The loop queues a step's update before it reads the step's loss: the update itself leaves the
    parameters and the optimizer state as they were when the loss sum is not finite or there are no tokens."""
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten, tree_map

    from conch_dna.training.kd.flat import FlatLayout
    from conch_dna.training.kd.update import make_update

    model = nn.Linear(4, 3)
    opt = optim.AdamW(learning_rate=0.1)
    opt.init(model.trainable_parameters())
    update = make_update(model, opt, max_grad_norm=1.0, compiled=compiled)
    grads = FlatLayout.of(model.trainable_parameters()).flatten(tree_map(lambda p: mx.ones_like(p) * 2.0, model.trainable_parameters()))

    def snapshot():
        mx.eval(model.parameters(), opt.state)
        return {k: np.array(v) for k, v in tree_flatten([model.parameters(), opt.state])}

    update(grads, mx.array(1.0), mx.array(2.0))  # one real step first: the state is not all zeros
    start = snapshot()
    for loss_sum, n in ((float("nan"), 2.0), (float("inf"), 2.0), (1.0, 0.0)):
        update(grads, mx.array(loss_sum), mx.array(n))
        after = snapshot()
        assert after.keys() == start.keys()
        for k in start:
            assert np.array_equal(after[k], start[k]), (loss_sum, n, k)
    norm = update(grads, mx.array(3.0), mx.array(2.0))
    after = snapshot()
    assert norm.item() == pytest.approx(np.sqrt(4 * 3 + 3))  # grads / n = 1 everywhere: 15 entries
    assert not np.array_equal(after["0.weight"], start["0.weight"]) and int(after["1.step"]) == int(start["1.step"]) + 1


def test_on_policy_share_is_written_by_the_student(tiny_pair, kd_config, monkeypatch):
    """With lambda = 1 every training sequence is the student's own answer, scored by the teacher online."""
    from conch_dna.training.kd import ConfigError, KDConfig, distiller

    teacher, student = tiny_pair
    written = []
    real = distiller.continue_prompts

    def spy(model, tok, examples, *a, **k):
        out = real(model, tok, examples, *a, **k)
        written.append((examples, out))
        return out

    monkeypatch.setattr(distiller, "continue_prompts", spy)
    cfg = kd_config(on_policy_lambda=1.0, iters=3, divergence="reverse_kl", own_answers="off")
    r = TrueKnowledgeDistiller(str(teacher), str(student), cfg).distill_domain("thinking", PROMPTS)
    assert len(written) == 3 and np.isfinite(r.final_train_loss)
    for before, after in written:
        assert [e.tokens[: e.prompt_len] for e in before] == [e.tokens[: e.prompt_len] for e in after]
    with pytest.raises(ConfigError, match="needs teacher_targets = 'online'"):
        KDConfig.load(on_policy_lambda=0.5, teacher_targets="cache")


def test_same_seed_same_adapter_in_a_fresh_process(tiny_pair, kd_config, tmp_path):
    """Reproducibility does not depend on whether this process generated the teacher data (cache hit)."""
    teacher, student = tiny_pair
    cfg = kd_config(iters=2, output_dir=str(tmp_path / "a"))
    TrueKnowledgeDistiller(str(teacher), str(student), cfg).distill_domain("task", PROMPTS)
    first = mx.load(str(tmp_path / "a/task/adapters.safetensors"))
    mx.eval(first)
    mx.random.seed(12345)  # disturb the global random state; the cache is hit this time
    TrueKnowledgeDistiller(str(teacher), str(student), cfg).distill_domain("task", PROMPTS)
    second = mx.load(str(tmp_path / "a/task/adapters.safetensors"))
    for k in first:
        assert np.array_equal(np.array(first[k]), np.array(second[k])), k


@pytest.mark.parametrize("targets", ["online", "cache"])
def test_compiled_step_trains_the_same_adapter(tiny_pair, kd_config, tmp_path, targets):
    """compile_step="on" (the default on GPUs) against "off": the same adapter after 4 AdamW steps of 2
    micro-batches of different lengths (compiled with half the blocks checkpointed). With LoRA dropout the compiled runs pad to a multiple of 32, so
    their dropout masks differ from eager ones: there, two compiled runs must agree bit for bit."""
    teacher, student = tiny_pair

    def train(mode, dropout, name, **kw):
        cfg = kd_config(iters=4, grad_accumulation=2, teacher_targets=targets, compile_step=mode,
                        lora={"dropout": dropout}, output_dir=str(tmp_path / name), **kw)
        TrueKnowledgeDistiller(str(teacher), str(student), cfg).distill_domain("task", PROMPTS)
        return {k: np.array(v) for k, v in mx.load(str(tmp_path / name / "task/adapters.safetensors")).items()}

    off, on = train("off", 0.0, "off"), train("on", 0.0, "on", grad_checkpoint=True, grad_checkpoint_every=2)
    assert on.keys() == off.keys()
    # Step 1 starts from the same parameters: same loss and gradient norm (on a GPU float32 matmuls may run
    # as TF32, 10-bit mantissa).
    cpu = mx.default_device() == mx.cpu
    first = [next(json.loads(r) for r in (tmp_path / n / "task/metrics.jsonl").read_text().splitlines()
                  if json.loads(r)["type"] == "train") for n in ("off", "on")]
    for key in ("loss", "grad_norm"):
        assert first[1][key] == pytest.approx(first[0][key], rel=1e-5 if cpu else 2e-3), key
    if cpu:  # on a GPU, AdamW's normalised steps turn TF32 rounding of near-zero gradients into ~1% of the adapter
        for k in off:
            assert np.linalg.norm(on[k] - off[k]) <= 1e-3 * np.linalg.norm(off[k]), k
    assert any(np.abs(off[k]).max() > 0 for k in off if "lora_b" in k)  # training moved the adapter
    a, b = train("on", 0.1, "drop1"), train("on", 0.1, "drop2")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.allclose(a[k], on[k], atol=1e-3) for k in a)  # dropout did act


@pytest.mark.parametrize("multiple", [1, 8, 32])
def test_pad_batch_rounds_the_length_and_masks_the_padding(multiple):
    from conch_dna.training.kd.examples import Example, pad_batch

    batch = [Example(tuple(range(1, 11)), 4), Example(tuple(range(1, 4)), 1)]
    tokens, mask = pad_batch(batch, pad_id=0, multiple=multiple)
    width = -(-10 // multiple) * multiple
    assert tokens.shape == mask.shape == (2, width)
    assert np.array(tokens)[0, :10].tolist() == list(range(1, 11)) and not np.array(tokens)[0, 10:].any()
    assert np.array(mask).sum(axis=1).tolist() == [6, 2]  # responses only: never a padding position
    assert np.array(mask)[1].tolist() == [False, True, True] + [False] * (width - 3)


def test_teacher_prefetch_runs_ahead_and_trains_the_same_adapter(tiny_pair, kd_config, tmp_path, monkeypatch):
    """teacher_prefetch="on": the teacher's pass for the next micro-batch (within a step and across steps)
    is launched on its own stream, unwaited, before this micro-batch's student step, never past the last
    step; validation passes stay synchronous. The adapter is that of a run without prefetch, bit for bit."""
    import conch_dna.training.kd.targets as targets_mod

    teacher, student = tiny_pair
    real = targets_mod.teacher_hidden
    log = []

    def recording(body, tokens, max_tokens, wait=True):
        on_side_stream = mx.default_stream(mx.default_device()) != base_stream
        log.append(("teacher", wait, on_side_stream))
        return real(body, tokens, max_tokens, wait)

    base_stream = mx.default_stream(mx.default_device())
    monkeypatch.setattr(targets_mod, "teacher_hidden", recording)

    def train(mode):
        log.clear()
        cfg = kd_config(iters=3, grad_accumulation=2, val_interval=10, teacher_targets="online",
                        teacher_prefetch=mode, output_dir=str(tmp_path / mode), memory_limit_gb=3.0,
                        teacher_states_memory_gb=0)  # every step runs the teacher

        def on_step(sender, **kw):
            log.append(("step-completed",))
            limits.add(mx.get_memory_limit())
        with signals.step_completed.connected_to(on_step):
            TrueKnowledgeDistiller(str(teacher), str(student), cfg).distill_domain("task", PROMPTS)
        adapter = {k: np.array(v) for k, v in mx.load(str(tmp_path / mode / "task/adapters.safetensors")).items()}
        train_calls = [e for e in log if e[0] == "teacher" and not e[1]]
        return adapter, [e[0] for e in log if e[0] == "step-completed" or not e[1]], train_calls

    limits, before = set(), mx.get_memory_limit()
    off, off_order, off_train = train("off")
    assert limits == {3 * 2**30} and mx.get_memory_limit() == before  # memory_limit_gb: set while training only
    on, on_order, on_train = train("on")
    assert off_train == []  # without prefetch every pass is waited for
    assert len(on_train) == 3 * 2 and all(side for _, _, side in on_train)  # 3 steps x 2 micro-batches, no more
    # Step 1's figures are read once step 2 is queued: by then the passes of steps 1 and 2 and the first of
    # step 3 were launched.
    assert on_order[:6] == ["teacher"] * 5 + ["step-completed"]
    assert on_order.count("step-completed") == 3
    assert on.keys() == off.keys()
    for k in off:
        assert np.array_equal(on[k], off[k]), k


def test_prefetch_settings_and_memory_limit():
    from conch_dna.training.kd import ConfigError, KDConfig
    from conch_dna.training.kd.trainer import memory_limit, use_prefetch

    assert use_prefetch(KDConfig()) and use_prefetch(KDConfig(teacher_prefetch="on"))
    assert not use_prefetch(KDConfig(teacher_prefetch="off"))
    assert not use_prefetch(KDConfig(teacher_prefetch="auto", on_policy_lambda=0.5))
    with pytest.raises(ConfigError, match="teacher_prefetch = 'on' cannot be combined with on_policy_lambda"):
        KDConfig.load(teacher_prefetch="on", on_policy_lambda=0.5)
    with pytest.raises(ConfigError, match="memory_limit_gb"):
        KDConfig.load(memory_limit_gb=0)
    before = mx.get_memory_limit()
    with pytest.raises(RuntimeError, match="inside"):
        with memory_limit(1.5):
            assert mx.get_memory_limit() == int(1.5 * 2**30)
            raise RuntimeError("inside")
    assert mx.get_memory_limit() == before
    with memory_limit(None):
        assert mx.get_memory_limit() == before


def test_kept_teacher_states_run_the_teacher_once_per_example(tiny_pair, kd_config, tmp_path, monkeypatch):
    """Online targets over several epochs: each fixed example's teacher states are computed once (alone, at its
    own length) and kept; the adapter equals that of a run whose teacher runs every step (to float rounding:
    other batch shapes). Off with 0 GB, with on-policy sequences, and when the states would not fit."""
    import conch_dna.training.kd.targets as targets_mod

    teacher, student = tiny_pair
    real, calls = targets_mod.teacher_hidden, []

    def counting(body, tokens, max_tokens, wait=True):
        calls.append(tokens.shape)
        return real(body, tokens, max_tokens, wait)

    monkeypatch.setattr(targets_mod, "teacher_hidden", counting)

    def train(name, **kw):
        calls.clear()
        cfg = kd_config(iters=9, batch_size=2, val_interval=3, output_dir=str(tmp_path / name), own_answers="off", **kw)
        r = TrueKnowledgeDistiller(str(teacher), str(student), cfg).distill_domain("task", PROMPTS)
        adapter = {k: np.array(v) for k, v in mx.load(str(tmp_path / name / "task/adapters.safetensors")).items()}
        return r, adapter, list(calls)

    r_kept, kept, kept_calls = train("kept")
    r_every, every, every_calls = train("every", teacher_states_memory_gb=0)
    n_examples = r_kept.num_train_samples + r_kept.num_val_samples
    assert 9 * 2 >= 2 * r_kept.num_train_samples  # 9 steps of 2: at least two epochs
    assert len(kept_calls) == n_examples and all(shape[0] == 1 for shape in kept_calls)  # once each, alone
    assert sum(shape[0] for shape in every_calls) > 2 * n_examples  # rows the teacher ran
    for k in every:
        np.testing.assert_allclose(kept[k], every[k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert r_kept.final_val_kd == pytest.approx(r_every.final_val_kd, rel=1e-4)
    _, _, tiny_budget = train("tiny-budget", teacher_states_memory_gb=1e-9)
    assert sum(shape[0] for shape in tiny_budget) > 2 * n_examples


def test_kept_states_are_not_used_for_on_policy_sequences(tiny_pair, kd_config):
    from conch_dna.training.kd.targets import kept_states, teacher_targets

    teacher, _ = tiny_pair
    model, _ = load_model(str(teacher))
    examples = {"train": [Example((1, 2, 3), 1)], "val": []}
    assert teacher_targets(model, kd_config(), None, examples=examples).__name__ == kept_states(None, {}).__name__
    assert teacher_targets(model, kd_config(on_policy_lambda=0.5), None, examples=examples).__name__ == "online"
    assert teacher_targets(model, kd_config(), None, examples=None).__name__ == "online"


def test_own_answers_join_training_and_a_resume_reuses_them(tiny_pair, kd_config, tmp_path, monkeypatch):
    """own_answers: the student answers each training prompt once, greedily, before its first step; the
    answers are trained on (with the unlikelihood term) and kept, so that a resumed run trains on the same
    ones and ends with the adapter an uninterrupted run makes."""
    from conch_dna.training.kd import ConfigError, KDConfig, distiller

    teacher, student = tiny_pair
    calls = []
    real = distiller.continue_prompts

    def spy(model, tok, examples, gen, *a, **k):
        calls.append((len(examples), gen.temperature))
        return real(model, tok, examples, gen, *a, **k)

    monkeypatch.setattr(distiller, "continue_prompts", spy)
    full = kd_config(iters=6, output_dir=str(tmp_path / "full"), own_answers="on", unlikelihood=1.0)
    r = TrueKnowledgeDistiller(str(teacher), str(student), full).distill_domain("task", PROMPTS)
    saved = json.loads((tmp_path / "full/task/own_answers.json").read_text())
    train_idx, _ = split_examples(list(range(len(PROMPTS))), full.val_fraction, full.seed)
    assert calls == [(len(train_idx), 0.0)] and np.isfinite(r.final_train_loss)
    assert sorted(d["prompt"] for d in saved) == sorted(PROMPTS[i] for i in train_idx)
    assert all(len(d["tokens"]) > d["prompt_len"] for d in saved)

    part = full.model_copy(update={"output_dir": tmp_path / "part"})
    stop_after_steps(TrueKnowledgeDistiller(str(teacher), str(student), part), "task", 3)
    calls.clear()
    TrueKnowledgeDistiller(str(teacher), str(student), part).distill_domain("task", PROMPTS, resume=True)
    assert calls == []  # the resumed run read the answers back instead of writing new ones
    a = mx.load(str(tmp_path / "full/task/adapters.safetensors"))
    b = mx.load(str(tmp_path / "part/task/adapters.safetensors"))
    for k in a:
        assert np.array_equal(np.array(a[k]), np.array(b[k])), k
    with pytest.raises(ConfigError, match="own_answers = 'on' needs teacher_targets = 'online'"):
        KDConfig.load(own_answers="on", teacher_targets="cache")


def test_a_cuda_graph_out_of_memory_says_what_to_do(tiny_pair, kd_config, monkeypatch):
    """MLX's bare "cudaGraphInstantiate ... out of memory" reaches the user with the setting that avoids it;
    any other error passes through as it was."""
    import conch_dna.training.kd.distiller as dist

    teacher, student = tiny_pair
    d = TrueKnowledgeDistiller(teacher_model_id=str(teacher), student_model_id=str(student), config=kd_config(iters=2))
    graph = RuntimeError("cudaGraphInstantiate(&handle_, graph, nullptr, nullptr, 0) failed: out of memory")
    monkeypatch.setattr(dist, "train_with_kd", lambda *a, **k: (_ for _ in ()).throw(graph))
    with pytest.raises(RuntimeError, match="MLX_USE_CUDA_GRAPHS=0") as caught:
        d.distill_domain("memory", PROMPTS[:4])
    assert caught.value.__cause__ is graph
    other = RuntimeError("something else")
    monkeypatch.setattr(dist, "train_with_kd", lambda *a, **k: (_ for _ in ()).throw(other))
    with pytest.raises(RuntimeError) as caught:
        d.distill_domain("memory", PROMPTS[:4])
    assert caught.value is other
