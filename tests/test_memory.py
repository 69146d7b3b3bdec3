"""Memory preflight: estimates grow with the right settings; a run that cannot fit is refused with advice."""

import dataclasses
import re

import mlx.core as mx
import pytest

from conch_dna.models import load_model
from conch_dna.training.kd import KDConfig, TrueKnowledgeDistiller
from conch_dna.training.kd.memory import MemoryPreflightError, estimate_peak_bytes, preflight
from conch_dna.training.kd.trainer import apply_lora
from tests.conftest import PROMPTS


@pytest.fixture(scope="module")
def pair(tiny_pair):
    t, _ = load_model(tiny_pair[0])
    s, _ = load_model(tiny_pair[1])
    apply_lora(s, KDConfig())
    return t, s


def test_estimate_scales_with_the_settings(pair):
    t, s = pair
    cfg = KDConfig()
    base = estimate_peak_bytes(s, t, cfg, 4, 256)
    assert estimate_peak_bytes(s, t, cfg, 8, 256)["activations"] == 2 * base["activations"]
    assert estimate_peak_bytes(s, None, cfg, 4, 256)["weights"] < base["weights"]
    ckpt = estimate_peak_bytes(s, t, cfg.model_copy(update={"grad_checkpoint": True}), 4, 256)
    assert ckpt["activations"] < base["activations"]
    mlp = estimate_peak_bytes(s, t, cfg.model_copy(update={"grad_checkpoint": True, "grad_checkpoint_scope": "mlp"}), 4, 256)
    assert ckpt["activations"] < mlp["activations"] < base["activations"]  # keeps attention's, not the MLPs'
    ref = estimate_peak_bytes(s, t, cfg.model_copy(update={"loss_impl": "reference"}), 4, 4096)
    fused = estimate_peak_bytes(s, t, cfg, 4, 4096)
    assert ref["loss"] == 16 * fused["loss"]  # fused: one chunk of 1024 rows, reference: all 16384


def test_refuses_with_settings_that_fit(pair):
    t, s = pair
    cfg = KDConfig(batch_size=16)
    need = estimate_peak_bytes(s, t, cfg, 16, 512)["total"]
    with pytest.raises(MemoryPreflightError, match="Settings that would fit: batch_size=") as e:
        preflight(s, t, cfg, 16, 512, available=int(need * 0.6))
    assert "GB" in str(e.value)
    assert preflight(s, t, cfg, 16, 512, available=need * 2)["total"] == need


@pytest.mark.parametrize("fits", ["mlp", "mixed", "block"])
def test_refusal_suggests_the_cheaper_checkpointing_that_fits(pair, fits):
    """The least recompute that fits is suggested: only the MLPs; else the MLPs with the first blocks whole;
    else whole blocks."""
    t, s = pair
    cfg = KDConfig(batch_size=16, teacher_pass_tokens=512)

    def need(scope, whole=0):
        update = {"grad_checkpoint": True, "grad_checkpoint_scope": scope, "grad_checkpoint_whole_blocks": whole}
        return estimate_peak_bytes(s, t, cfg.model_copy(update=update), 16, 512)["total"]

    assert need("block") < need("mlp", 1) < need("mlp") < estimate_peak_bytes(s, t, cfg, 16, 512)["total"]
    available = int({"mlp": need("mlp"), "mixed": need("mlp", 1), "block": need("block")}[fits] / 0.9) + 1
    with pytest.raises(MemoryPreflightError) as e:
        preflight(s, t, cfg, 16, 512, available=available)
    msg = str(e.value)
    assert bool(re.search(r'grad_checkpoint=true with grad_checkpoint_scope="mlp"[;.]', msg)) == (fits == "mlp")
    assert ('grad_checkpoint=true with grad_checkpoint_scope="mlp" and grad_checkpoint_whole_blocks=1' in msg) == (fits == "mixed")
    assert "grad_checkpoint=true" in msg


def test_distiller_refuses_before_training(tiny_pair, kd_config, monkeypatch):
    import conch_dna.training.kd.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)  # a 1 MB device
    cfg = kd_config()
    with pytest.raises(MemoryPreflightError, match="exceeds"):
        TrueKnowledgeDistiller(str(tiny_pair[0]), str(tiny_pair[1]), cfg).distill_domain("thinking", PROMPTS)
    assert not (cfg.output_dir / "thinking" / "metrics.jsonl").exists()


@pytest.mark.parametrize("scope", ["block", "mlp"])
def test_memory_limit_caps_the_estimate_down_to_what_the_step_holds(pair, scope):
    """Under memory_limit_gb MLX waits for temporaries (the teacher's pass, work queued ahead) to be freed
    instead of going past the limit, but what the step holds (weights, optimizer, the activations the
    student's blocks keep, one loss chunk) stays."""
    from conch_dna.training.kd.memory import HELD_MARGIN, held_student_bytes, model_shapes

    t, s = pair
    # The whole batch in one teacher pass and a checkpointed student: the teacher's transient is the larger phase.
    cfg = KDConfig(teacher_pass_tokens=1 << 20, grad_checkpoint=True, grad_checkpoint_scope=scope, loss_chunk_size=128)
    free = estimate_peak_bytes(s, t, cfg, 8, 256)
    kept = held_student_bytes(model_shapes(s), cfg, 8 * 256, 4, 128)
    held = int(HELD_MARGIN * (free["weights"] + free["optimizer"] + kept + free["attention"]))
    if scope == "block":  # the case that matters most: the teacher's transient is the larger phase
        assert free["teacher_forward"] > free["activations"] + free["attention"] + free["loss"]
    assert kept < free["activations"] + free["loss"] and held < free["total"]

    def capped(limit_bytes):
        return estimate_peak_bytes(s, t, cfg.model_copy(update={"memory_limit_gb": limit_bytes / 2**30}), 8, 256)["total"]

    assert capped(2 * free["total"]) == free["total"]  # a limit above the estimate changes nothing
    middle = (held + free["total"]) // 2
    assert abs(capped(middle) - middle) <= 1  # in between: the limit
    assert capped(held // 2) == held  # below what must be held: that
    # and the limit is what lets it fit: refused without it, accepted with it, on the same device
    available = int(middle / 0.85)
    with pytest.raises(MemoryPreflightError):
        preflight(s, t, cfg, 8, 256, available=available)
    assert preflight(s, t, cfg.model_copy(update={"memory_limit_gb": middle / 2**30}), 8, 256, available=available)


def test_held_memory_follows_the_checkpoint_scope_and_the_loss_path(pair, monkeypatch):
    from conch_dna.training.kd import kernels
    from conch_dna.training.kd.memory import held_student_bytes, model_shapes

    _, s = pair
    shapes = dataclasses.replace(model_shapes(s), layers=4)  # every other block: two of four (of two, the last
    # block would keep its activations only as long as the other block's recompute would hold them)

    def held(**kw):
        return held_student_bytes(shapes, KDConfig(**kw), 4096, 2, 512)

    plain, mlp = held(), held(grad_checkpoint=True, grad_checkpoint_scope="mlp")
    block = held(grad_checkpoint=True)
    assert block < mlp < plain
    assert held(grad_checkpoint=True, grad_checkpoint_every=2) > block
    monkeypatch.setattr(kernels, "available", lambda: True)  # the CUDA kernel: 3 bf16 buffers, not 6 float32
    assert held() < plain


def test_refusal_suggests_a_memory_limit_when_the_teacher_pass_is_what_does_not_fit(pair):
    t, s = pair
    cfg = KDConfig(teacher_pass_tokens=1 << 20, grad_checkpoint=True, loss_chunk_size=64)
    est = estimate_peak_bytes(s, t, cfg, 16, 128)
    held = est["weights"] + est["optimizer"] + est["activations"] + est["attention"] + est["loss"]
    available = int(1.25 * held / 0.8) + (1 << 20)  # room for what is held, not for the teacher's transients
    assert est["total"] > 0.9 * available
    with pytest.raises(MemoryPreflightError, match=r"memory_limit_gb=\d"):
        preflight(s, t, cfg, 16, 128, available=available)


def test_a_budget_gets_the_fastest_setting_that_fits(pair):
    """settings_for_budget walks settings_fastest_first, each without then with a memory limit: no recompute
    while it fits, then the MLPs, then the MLPs and more and more whole blocks, then all blocks whole, then
    smaller micro-batches with the same optimizer batch; too small: refused."""
    from conch_dna.training.kd.memory import memory_limit_for, settings_fastest_first, settings_for_budget

    t, s = pair
    cfg = KDConfig(batch_size=16, teacher_pass_tokens=512)
    gb = 2**30

    def need(update, batch=16):
        return estimate_peak_bytes(s, t, cfg.model_copy(update=update), batch, 512)["total"]

    settings = settings_fastest_first(len(s.layers))
    plain, mlp, block = settings[0], settings[1], settings[-2]
    assert len(settings) == 5 + len(s.layers) - 1 and block["grad_checkpoint_scope"] == "block"
    assert settings_for_budget(s, t, cfg, 512, need(plain) / gb) == {**plain, "batch_size": 16, "grad_accumulation": 1,
                                                                      "memory_limit_gb": None}
    between = (need(mlp) + need(plain)) / 2 / gb  # the MLPs' recompute fits; no recompute only under a limit
    limited = {**plain, "memory_limit_gb": memory_limit_for(between)}
    plain_held = need(limited) / gb <= memory_limit_for(between)
    assert (memory_limit_for(8), memory_limit_for(16), memory_limit_for(40)) == (7.25, 15.25, 39.25)  # 0.75 GB below
    assert (memory_limit_for(8, 3.8), memory_limit_for(16, 3.8)) == (6.5, 15.25)  # 1.5 GB where the weights fill 40%
    assert settings_for_budget(s, t, cfg, 512, between) == ({**limited, "batch_size": 16, "grad_accumulation": 1}
                                                            if plain_held else {**mlp, "batch_size": 16, "grad_accumulation": 1, "memory_limit_gb": None})
    # Below the step's floor with no recompute: the MLPs or whole blocks recomputed, or smaller micro-batches.
    tight = settings_for_budget(s, t, cfg, 512, need(block) / gb * 0.9)
    assert tight.get("grad_checkpoint") or tight["batch_size"] < 16
    assert tight["batch_size"] * tight["grad_accumulation"] == 16
    chosen = cfg.model_copy(update=tight)
    assert estimate_peak_bytes(s, t, chosen, tight["batch_size"], 512)["total"] <= need(block) * 0.9
    with pytest.raises(MemoryPreflightError, match="no setting fits a memory budget of 0.001 GB"):
        settings_for_budget(s, t, cfg, 512, 0.001)


def test_distiller_applies_the_budget(tiny_pair, kd_config):
    """memory_budget_gb replaces the memory settings before training (the result records them); a budget that
    nothing fits is refused before the first step, with no adapter written."""
    from conch_dna.training.kd.memory import settings_fastest_first

    teacher, student = tiny_pair
    cfg = kd_config(iters=2, batch_size=4, memory_budget_gb=1.0, grad_checkpoint=True, loss_chunk_size=64)
    r = TrueKnowledgeDistiller(str(teacher), str(student), cfg).distill_domain("task", PROMPTS)
    plain = settings_fastest_first(2)[0]  # the first setting does not depend on the model's depth
    assert {k: r.config[k] for k in plain} == plain  # plenty: no recompute
    assert (r.config["batch_size"], r.config["grad_accumulation"], r.config["memory_limit_gb"]) == (4, 1, None)
    small = cfg.model_copy(update={"memory_budget_gb": 1e-4, "output_dir": cfg.output_dir / "small"})
    with pytest.raises(MemoryPreflightError, match="no setting fits a memory budget"):
        TrueKnowledgeDistiller(str(teacher), str(student), small).distill_domain("task", PROMPTS)
    assert not (cfg.output_dir / "small/task/adapters.safetensors").exists()


def test_distiller_advises_bounding_the_queue_where_it_would_pay(tiny_pair, kd_config, monkeypatch):
    """In a process whose GPU queue was not bounded at its start (EGO distilling itself), a tight memory limit
    gets a warning that says what to set; bounded, none."""
    from structlog.testing import capture_logs

    from conch_dna.training.kd import memory

    teacher, student = tiny_pair
    weights = memory.stored_weights_bytes(str(teacher), str(student))
    monkeypatch.setattr(memory, "on_cuda", lambda: True)
    monkeypatch.setenv("MLX_MAX_MB_PER_BUFFER", "0")
    monkeypatch.delenv("MLX_MAX_MB_PER_BUFFER")
    cfg = kd_config(iters=1, batch_size=2, memory_limit_gb=2 * weights / 2**30)  # the weights fill half of it
    with capture_logs() as logs:
        TrueKnowledgeDistiller(str(teacher), str(student), cfg).distill_domain("task", PROMPTS)
    (warning,) = [e for e in logs if e["event"] == "gpu queue unbounded"]
    assert warning["log_level"] == "warning" and "MLX_MAX_MB_PER_BUFFER=100" in warning["advice"]
    assert memory.queue_advice(100 * weights / 2**30, weights) is None  # room to spare: nothing to do
    monkeypatch.setenv("MLX_MAX_MB_PER_BUFFER", "100")
    assert memory.queue_advice(2 * weights / 2**30, weights) is None  # bounded already


def test_lean_backward_estimate_keeps_fewer_intermediate_activations(tiny_pair):
    from conch_dna.training.kd.memory import held_student_bytes, model_shapes

    student, _ = load_model(tiny_pair[1])
    shapes = model_shapes(student)
    on, off = (KDConfig(lean_backward=v) for v in ("on", "off"))
    tokens, rows = 4 * 64, 64
    assert held_student_bytes(shapes, off, tokens, 4, rows) - held_student_bytes(shapes, on, tokens, 4, rows) == \
        tokens * shapes.layers * shapes.intermediate * 1.5 * 4  # SwiGLU's sigmoid, silu(gate), kept without it
    assert estimate_peak_bytes(student, None, on, 4, 64)["activations"] < estimate_peak_bytes(student, None, off, 4, 64)["activations"]


def test_whole_blocks_put_the_mlp_scope_between_the_two_scopes():
    """grad_checkpoint_whole_blocks: `block_kinds_for` mirrors `checkpoint_blocks` (the first picked blocks
    whole); the estimates fall as more blocks are whole, from the MLP scope's to at most the block scope's;
    and the first blocks are the ones to recompute whole, since the backward pass meets them last, when the
    later blocks' activations are gone (`backward_peak`)."""
    from conch_dna.training.kd.lean import block_kinds_for
    from conch_dna.training.kd.memory import Shapes, backward_peak, held_student_bytes

    def cfg(**kw):
        return KDConfig(grad_checkpoint=True, grad_checkpoint_scope="mlp", **kw)

    assert block_kinds_for(cfg(grad_checkpoint_every=2, grad_checkpoint_whole_blocks=2), 5) == ["whole", "plain", "whole", "plain", "mlp"]
    assert block_kinds_for(cfg(grad_checkpoint_whole_blocks=7), 3) == ["whole"] * 3
    assert block_kinds_for(KDConfig(grad_checkpoint=True), 3) == ["whole"] * 3 and block_kinds_for(KDConfig(), 2) == ["plain"] * 2
    shapes = Shapes(layers=24, hidden=896, intermediate=4864, heads=14, vocab=151936)  # Qwen2.5-0.5B

    def held(**kw):
        return held_student_bytes(shapes, cfg(**kw), 32 * 1024, 2, 1024)

    series = [held(grad_checkpoint_whole_blocks=w) for w in range(25)]
    assert series[0] == held() and series[24] == held_student_bytes(shapes, KDConfig(grad_checkpoint=True), 32 * 1024, 2, 1024)
    assert all(a > b for a, b in zip(series[:23], series[1:23]))  # each whole block lowers the floor...
    assert series[23] < series[24]  # ...up to the last, whose own recompute is then the largest part
    kept, recomputed = {"whole": 1.0, "mlp": 5.0}, {"whole": 20.0, "mlp": 10.0}
    assert backward_peak(["whole", "mlp", "mlp"], kept, recomputed) < backward_peak(["mlp", "mlp", "whole"], kept, recomputed)


def test_the_frontier_s_16_gb_budget_gets_the_fewest_whole_blocks_that_fit(monkeypatch):
    """The frontier's 16 GB budget for the qwen2.5-1.5b->0.5b preset (batch 32 x 1024, bf16, on a GPU): all MLPs
    recomputed does not fit, all blocks whole does; the chooser takes the MLP scope with the fewest whole
    blocks that fit (one fewer would not), in one micro-batch."""
    from benchmarks.bench_kd import PEER_LORA, PRESETS, build
    from conch_dna.training.kd import memory

    monkeypatch.setattr(memory, "keeps_attention_scores", lambda: False)  # a GPU's fused attention
    monkeypatch.setattr(memory.kernels, "available", lambda: True)  # and its loss kernel
    t_shape, s_shape, vocab, _, seq = PRESETS["qwen2.5-1.5b->0.5b"]
    t, s = (build(shape, vocab, mx.bfloat16, materialize=False) for shape in (t_shape, s_shape))
    apply_lora(s, KDConfig(lora=PEER_LORA))
    cfg = KDConfig(lora=PEER_LORA, batch_size=32, lean_backward="on")  # as on a GPU
    chosen = memory.settings_for_budget(s, t, cfg, seq, 16)
    w = chosen["grad_checkpoint_whole_blocks"]
    assert (chosen["batch_size"], chosen["grad_checkpoint_scope"], chosen["loss_chunk_size"]) == (32, "mlp", 1024)
    assert 1 <= w < len(s.layers) and chosen["memory_limit_gb"] == memory.memory_limit_for(16)

    def need(whole):
        return memory.estimate_peak_bytes(s, t, cfg.model_copy(update={**chosen, "grad_checkpoint_whole_blocks": whole}), 32, seq)["total"]

    assert need(w) <= chosen["memory_limit_gb"] * 2**30 < need(w - 1)


def test_the_teacher_pass_counts_one_intermediate_more_with_the_swiglu_kernel(monkeypatch):
    """On NVIDIA GPUs the teacher's SwiGLU runs our kernel, whose output takes a buffer of its own (MLX's
    compiled swiglu writes into an input's): one more [tokens, intermediate] value per block and token. The
    frontier's choices (all four budgets) are the settings measured on an H200; at 8 GB, where the
    weights are 3.8 of it, the same setting as at 7.25 GB under a limit 1.5 GB below the budget (7.46 GB peak
    measured; under 7.25 MLX went to 8.39)."""
    from benchmarks.bench_kd import PEER_LORA, PRESETS, build
    from conch_dna.training.kd import memory

    monkeypatch.setattr(memory, "keeps_attention_scores", lambda: False)
    t_shape, s_shape, vocab, _, seq = PRESETS["qwen2.5-1.5b->0.5b"]
    t, s = (build(shape, vocab, mx.bfloat16, materialize=False) for shape in (t_shape, s_shape))
    apply_lora(s, KDConfig(lora=PEER_LORA))
    cfg = KDConfig(lora=PEER_LORA, batch_size=32, lean_backward="on")
    monkeypatch.setattr(memory.kernels, "available", lambda: False)
    portable = memory.teacher_forward_bytes(t, cfg, 32, seq, 2)
    monkeypatch.setattr(memory.kernels, "available", lambda: True)
    rows = 2 * cfg.teacher_pass_tokens // seq
    assert memory.teacher_forward_bytes(t, cfg, 32, seq, 2) - portable == rows * seq * len(t.layers) * t_shape["inter"] * 2
    assert frontier_picks(memory, t, s, cfg, seq) == {8: (16, "mlp", 23, 1024, 6.5), 16: (32, "mlp", 7, 1024, 15.25),
                                                      25: (32, "mlp", 0, 2048, 24.25), 40: (32, False, 0, 2048, 39.25)}
    # With MLX's CUDA queue bounded the limit keeps the usual 0.75 GB of headroom and a floor above it no longer
    # idles the GPU: 8 GB gets one micro-batch of 32 with every block recomputed, chunk 512, whose floor (7.41 GB
    # measured) plus BOUNDED_OVERSHOOT_GB fits 8 GB (7.74-7.84 GB peaks measured; 74.6-81.6k
    # tokens/s against 69.6-75.1k for 2 x 16). The next faster setting (chunk 1024) would not fit; 16 GB and up
    # leave the queue unbounded (`queue_bound_pays`), so nothing else moves.
    monkeypatch.setattr(memory, "queue_bounded", lambda: True)
    assert frontier_picks(memory, t, s, cfg, seq)[8] == (32, "block", 0, 512, 7.25)
    block = {"batch_size": 32, "grad_checkpoint": True, "grad_checkpoint_scope": "block", "memory_limit_gb": 7.25}
    floor = {c: memory.estimate_peak_bytes(s, t, cfg.model_copy(update={**block, "loss_chunk_size": c}), 32, seq)["floor"]
             for c in (512, 1024)}
    assert floor[512] + memory.BOUNDED_OVERSHOOT_GB * 2**30 <= 8 * 2**30 < floor[1024] + memory.BOUNDED_OVERSHOOT_GB * 2**30
    assert abs(floor[512] / 2**30 - 7.41) < 0.05  # the formula against the measured floor
    assert memory.settings_for_budget(s, t, cfg, seq, 8, bounded=False)["batch_size"] == 16  # unbounded: as before


def frontier_picks(memory, t, s, cfg, seq) -> dict:
    picks = {b: memory.settings_for_budget(s, t, cfg, seq, b) for b in (8, 16, 25, 40)}
    return {b: (p["batch_size"], p["grad_checkpoint"] and p["grad_checkpoint_scope"], p.get("grad_checkpoint_whole_blocks", 0),
                p["loss_chunk_size"], p["memory_limit_gb"]) for b, p in picks.items()}


def test_the_gpu_queue_is_bounded_where_the_budget_is_tight_on_cuda_only_and_the_environment_wins(monkeypatch, tmp_path):
    """`bound_gpu_queue` sets MLX_MAX_MB_PER_BUFFER for MLX's CUDA backend where the weights fill over TIGHT_SHARE
    of the budget (8 GB with 4.1 of weights, not 16 or 40: measured slower there), never over a value the user set,
    and nowhere else (Metal closes its command buffers at 40-50 MB already; a bound there is not measured)."""
    from conch_dna.training.kd import memory

    gb = 2**30
    monkeypatch.setenv("MLX_MAX_MB_PER_BUFFER", "0")  # recorded, so that the end of the test restores the original
    monkeypatch.delenv("MLX_MAX_MB_PER_BUFFER")
    monkeypatch.setattr(memory, "on_cuda", lambda: False)
    assert not memory.bound_gpu_queue(8, int(4.1 * gb)) and "MLX_MAX_MB_PER_BUFFER" not in memory.os.environ
    monkeypatch.setattr(memory, "on_cuda", lambda: True)
    for budget, weights in ((16, int(4.1 * gb)), (40, int(4.1 * gb)), (None, int(4.1 * gb)), (8, None)):
        assert not memory.bound_gpu_queue(budget, weights) and "MLX_MAX_MB_PER_BUFFER" not in memory.os.environ
    assert memory.bound_gpu_queue(8, int(4.1 * gb)) and memory.os.environ["MLX_MAX_MB_PER_BUFFER"] == str(memory.QUEUE_MB)
    monkeypatch.setenv("MLX_MAX_MB_PER_BUFFER", "1000")  # MLX's own default on an H200: not bounded
    assert not memory.bound_gpu_queue(8, int(4.1 * gb)) and memory.os.environ["MLX_MAX_MB_PER_BUFFER"] == "1000"
    monkeypatch.setenv("MLX_MAX_MB_PER_BUFFER", "50")
    assert memory.bound_gpu_queue(8, int(4.1 * gb)) and memory.queue_bounded()
    assert memory.memory_limit_for(8, 3.8, bounded=True) == 7.25 and memory.memory_limit_for(8, 3.8) == 6.5
    # The weights are what the model folders store; a folder that is not there (a hub id) gives no figure.
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "model-00001.safetensors").write_bytes(b"x" * 24)
    assert memory.stored_weights_bytes(str(tmp_path / "a"), str(tmp_path / "b")) == 1024
    assert memory.stored_weights_bytes(str(tmp_path / "a"), "Qwen/Qwen2.5-0.5B") is None


def test_a_compiled_step_on_cuda_says_its_first_steps_compile(tiny_pair, monkeypatch):
    from structlog.testing import capture_logs

    from conch_dna.models import load_model
    from conch_dna.training.kd import KDConfig, kernels
    from conch_dna.training.kd.trainer import build_step

    model, _ = load_model(str(tiny_pair[1]))
    monkeypatch.setattr(kernels, "on_cuda", lambda: True)
    monkeypatch.setattr(kernels, "use_rope_kernel", lambda m: None)  # the CUDA kernel itself needs the GPU
    for setting, said in (("on", True), ("off", False)):
        with capture_logs() as logs:
            build_step(model, KDConfig(compile_step=setting), None)
        hints = [e for e in logs if e["event"] == "kernels compile first"]
        assert bool(hints) == said and all("MLX_USE_CUDA_GRAPHS=0" in e["advice"] for e in hints)
