"""The fused chunked loss: same values and gradients as the reference losses (<= 1e-4 relative, float32)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from conch_dna.models import load_model
from conch_dna.models.tiny import build_tiny_model
from conch_dna.training.kd import DIVERGENCES, KDConfig, kd_objective, topk_targets
from conch_dna.training.kd.fused import Chunking, Rows, TeacherStates, fused_objective
from conch_dna.training.kd.losses import LossSpec
from conch_dna.training.kd.trainer import apply_lora

# The bar is <= 1e-4 relative in float32 (models loaded as float32 here). On a GPU, MLX's CUDA backend runs
# float32 matmuls as TF32 (10-bit mantissa): there the bar is TF32's rounding, as in test_distiller.
ON_CPU = mx.default_device() == mx.cpu
TOL = 1e-4 if ON_CPU else 2e-3
F32 = mx.float32


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.fixture(scope="module")
def models(tiny_pair, tmp_path_factory):
    teacher, student = tiny_pair
    untied = build_tiny_model(tmp_path_factory.mktemp("untied") / "s", num_layers=2, hidden_size=32, num_heads=2,
                              num_kv_heads=1, intermediate_size=64, seed=4, tie_word_embeddings=False, tokenizer_from=teacher)
    t, _ = load_model(teacher, F32)
    out = {}
    for name, path in (("tied", student), ("untied", untied)):
        s, _ = load_model(path, F32)
        apply_lora(s, KDConfig(lora={"rank": 4}))
        # Non-zero LoRA B so that every LoRA parameter has a gradient.
        for _, m in s.named_modules():
            if hasattr(m, "lora_b"):
                m.lora_b = mx.random.normal(m.lora_b.shape) * 0.05
        out[name] = s
    return t, out


def batch(seed=0, B=2, L=24, V=384):
    rng = np.random.default_rng(seed)
    tokens = mx.array(rng.integers(0, V, size=(B, L)))
    mask = np.zeros((B, L), bool)
    mask[0, 6:] = True
    mask[1, 3:15] = True  # ragged, with padding
    return tokens, mx.array(mask)


def compare(student, ref_fn, fused_fn):
    (l1, o1), g1 = nn.value_and_grad(student, ref_fn)(student)
    (l2, o2), g2 = nn.value_and_grad(student, fused_fn)(student)
    g1, g2 = dict(tree_flatten(g1)), dict(tree_flatten(g2))
    assert g1.keys() == g2.keys() and g1
    assert rel(l2.item(), l1.item()) <= TOL
    for part in ("kd", "ce", "ul"):
        assert rel(o2[part].item(), o1[part].item()) <= TOL, part
    for k in g1:
        assert rel(np.array(g2[k]), np.array(g1[k])) <= TOL, k


def pack(out):
    return out["loss"], out


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("head", ["tied", "untied"])
@pytest.mark.parametrize("alpha", [0.0, 0.7, 1.0])
def test_dense_online_matches_reference(models, div, head, alpha):
    teacher, students = models
    s = students[head]
    tokens, mask = batch()
    compare(
        s,
        lambda m: pack(kd_objective(m(tokens), teacher(tokens), tokens, mask, LossSpec(alpha, 2.0, div, 0.3))),
        lambda m: pack(fused_objective(m, teacher, tokens, mask, LossSpec(alpha, 2.0, div, 0.3), Chunking(10))),
    )


@pytest.mark.parametrize("div", DIVERGENCES)
def test_sparse_targets_match_reference(models, div):
    teacher, students = models
    tokens, mask = batch(1)
    sp = topk_targets(teacher(tokens), 16)
    compare(
        students["tied"],
        lambda m: pack(kd_objective(m(tokens), sp, tokens, mask, LossSpec(0.7, 4.0, div))),
        lambda m: pack(fused_objective(m, sp, tokens, mask, LossSpec(0.7, 4.0, div), Chunking(13))),
    )


def test_quantized_teacher_matches_reference(tiny_pair, models):
    teacher_path, _ = tiny_pair
    qt, _ = load_model(teacher_path, F32)
    nn.quantize(qt, group_size=32, bits=4)
    _, students = models
    tokens, mask = batch(2)
    compare(
        students["untied"],
        lambda m: pack(kd_objective(m(tokens), qt(tokens), tokens, mask)),
        lambda m: pack(fused_objective(m, qt, tokens, mask, chunking=Chunking(16))),
    )


def test_chunk_size_does_not_change_the_result(models):
    teacher, students = models
    tokens, mask = batch(3)
    outs = [fused_objective(students["tied"], teacher, tokens, mask, chunking=Chunking(c))["loss"].item()
            for c in (1, 7, 46, 4096)]
    assert max(outs) - min(outs) <= (1e-5 if ON_CPU else TOL) * abs(outs[0])


@pytest.mark.parametrize("loops", [False, True])
@pytest.mark.parametrize("backend", ["default", "compiled-mlx"])
def test_closed_form_paths_equal_generic_path(models, backend, loops, monkeypatch):
    """The default objective runs a closed-form chunk (NumPy on the CPU, compiled MLX on Apple GPUs, a CUDA
    kernel on NVIDIA: tests/test_kernels.py); each must equal the autograd chunk, with the loop terms too
    (no-repeat teacher and unlikelihood folded into the CE weights)."""
    from conch_dna.training.kd import kernels
    from conch_dna.training.kd.fused import _head_weight, fused_kd_loss, model_parts
    from conch_dna.training.kd.losses import loop_rows

    calls = []
    real = kernels.forward_kl_ce_rows_numpy
    monkeypatch.setattr(kernels, "forward_kl_ce_rows_numpy", lambda *a: calls.append(1) or real(*a))
    if backend == "compiled-mlx":
        monkeypatch.setenv("CONCH_FUSED_KERNEL", "0")

    teacher, students = models
    tokens, mask = batch(4)
    loop_kw = {}
    if loops:
        tokens = mx.where(mx.arange(24)[None, :] >= 6, mx.array([[5, 6, 7, 8] * 6, [9, 10, 11] * 8]), tokens)
        repeated = loop_rows(tokens, mask).reshape(-1)
        assert 4 < repeated.sum().item() < repeated.size
        loop_kw = dict(repeated=repeated, spec=LossSpec(unlikelihood=0.5, no_repeat_teacher=True))
    for s in students.values():
        body, head = model_parts(s)
        t_body, t_head = model_parts(teacher)
        assert _head_weight(head) is not None and _head_weight(t_head) is not None
        h, ht = body(tokens)[:, :-1], t_body(tokens)[:, :-1]
        teacher_states = TeacherStates(ht.reshape(-1, ht.shape[-1]), t_head)
        rows = Rows(tokens[:, 1:].reshape(-1), mask[:, 1:].reshape(-1), loop_kw.get("repeated"))
        spec = loop_kw.get("spec", LossSpec())

        def run(fast):
            f = lambda x: fused_kd_loss(x, head, teacher_states, rows, spec, Chunking(9, fast))["loss"]  # noqa: E731
            return mx.value_and_grad(f)(h.reshape(-1, h.shape[-1]))

        (v1, g1), (v2, g2) = run(True), run(False)
        assert rel(v1.item(), v2.item()) <= TOL and rel(np.array(g1), np.array(g2)) <= TOL
    assert bool(calls) == (backend == "default" and ON_CPU)  # NumPy on the CPU; on a GPU the default is a kernel


def test_compiled_step_equals_eager_and_sees_parameter_updates(models):
    """The trainer's mx.compile'd loss-and-gradient (default on GPUs) gives the eager values and gradients,
    for online hidden states and cached top-k targets, and reads the current LoRA weights (model state is a
    compiled input, not a baked-in constant)."""
    from conch_dna.training.kd.fused import TeacherStates, model_parts
    from conch_dna.training.kd.trainer import compile_loss_and_grad, make_objective

    teacher, students = models
    s = students["untied"]
    tokens, mask = batch(5)
    cfg = KDConfig(loss_chunk_size=11)
    t_body, t_head = model_parts(teacher)
    online = TeacherStates(t_body(tokens), t_head)
    cached = topk_targets(teacher(tokens), 16)
    eager = nn.value_and_grad(s, make_objective(cfg, None, True, False))
    traced = compile_loss_and_grad(s, nn.value_and_grad(s, make_objective(cfg, None, True, True)))
    losses = []
    for step, targets in enumerate((online, cached, online, cached)):
        if step == 2:  # what an optimizer step does: new LoRA weights, same compiled functions
            s.update(tree_map(lambda v: v + 0.01, s.trainable_parameters()))
        (l1, o1), g1 = eager(s, tokens, mask, targets)
        (l2, o2), g2 = traced(s, tokens, mask, targets)
        g1, g2 = dict(tree_flatten(g1)), dict(tree_flatten(g2))
        assert g1.keys() == g2.keys() and g1
        assert rel(l2.item(), l1.item()) <= TOL and rel(o2["kd"].item(), o1["kd"].item()) <= TOL
        for k in g1:
            assert rel(np.array(g2[k]), np.array(g1[k])) <= TOL, k
        losses.append(l2.item())
    assert losses[2] != losses[0] and losses[3] != losses[1]  # the update was seen
    with pytest.raises(ValueError, match="different model"):
        traced(students["tied"], tokens, mask, online)


def test_lora_layers_compute_in_the_model_dtype(tiny_pair):
    """bf16 student: our LoRA layer keeps float32 weights and gradients but bf16 activations (mlx-lm's
    promotes them to float32), and computes what mlx-lm's layer computes."""
    from mlx_lm.tuner.lora import LoRALinear as MlxLoRALinear

    _, student_path = tiny_pair
    s, _ = load_model(student_path)
    s.set_dtype(mx.bfloat16)
    apply_lora(s, KDConfig(lora={"rank": 4}))
    layer = s.model.layers[0].self_attn.q_proj
    assert isinstance(layer, MlxLoRALinear) and type(layer) is not MlxLoRALinear
    layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    assert layer.lora_a.dtype == layer.lora_b.dtype == mx.float32
    x = mx.random.normal((3, layer.lora_a.shape[0])).astype(mx.bfloat16)
    y = layer(x)
    assert y.dtype == mx.bfloat16
    assert rel(np.array(y.astype(mx.float32)), np.array(MlxLoRALinear.__call__(layer, x).astype(mx.float32))) < 1e-2
    _, grads = nn.value_and_grad(layer, lambda m: m(x).astype(mx.float32).sum())(layer)
    flat = dict(tree_flatten(grads))
    assert set(flat) == {"lora_a", "lora_b"} and all(g.dtype == mx.float32 for g in flat.values())


def teacher_and_twin_students(tiny_pair, trainable_norm=False):
    """The tiny teacher and two copies of the student with the same non-zero LoRA weights (and, with
    trainable_norm, a trainable final norm: it must keep its gradient)."""
    teacher_path, student_path = tiny_pair
    teacher, _ = load_model(teacher_path, F32)
    one, two = load_model(student_path, F32)[0], load_model(student_path, F32)[0]
    for s in (one, two):
        apply_lora(s, KDConfig(lora={"rank": 4}))
        if trainable_norm:
            s.model.norm.unfreeze()
    mx.random.seed(3)
    one.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, one.trainable_parameters()))
    two.update(one.trainable_parameters())
    return teacher, one, two


@pytest.mark.parametrize("every,scope,whole", [(1, "block", 0), (2, "block", 0), (1, "mlp", 0), (2, "mlp", 0),
                                               (1, "mlp", 1), (2, "mlp", 1)])
def test_checkpointed_blocks_give_the_same_gradients(tiny_pair, every, scope, whole):
    """Gradient checkpointing (all blocks, or every other one; whole blocks, their MLPs only, or the MLPs with
    the first picked block whole) recomputes instead of storing: same loss and gradients; only the student's
    own modules change class, not a teacher's of the same architecture."""
    from conch_dna.training.kd.lean import checkpoint_blocks

    teacher, plain, ckpt = teacher_and_twin_students(tiny_pair)
    n = checkpoint_blocks(ckpt, every, scope, whole)
    picked = list(range(0, len(ckpt.layers), every))
    assert n == len(picked) and len(ckpt.layers) >= 2
    whole_blocks = set(picked if scope == "block" else picked[:whole])
    mlp_blocks = set(picked) - whole_blocks
    checkpointed = lambda m: type(m).__name__.startswith("Checkpointed")  # noqa: E731
    assert [checkpointed(b) for b in ckpt.layers] == [i in whole_blocks for i in range(len(ckpt.layers))]
    assert [checkpointed(b.mlp) for b in ckpt.layers] == [i in mlp_blocks for i in range(len(ckpt.layers))]
    others = list(plain.layers) + list(teacher.layers) + [b.mlp for b in list(plain.layers) + list(teacher.layers)]
    assert not any(checkpointed(m) for m in others)
    tokens, mask = batch(6)
    f = lambda m: pack(fused_objective(m, teacher, tokens, mask, chunking=Chunking(16)))  # noqa: E731
    (l1, _), g1 = nn.value_and_grad(plain, f)(plain)
    (l2, _), g2 = nn.value_and_grad(ckpt, f)(ckpt)
    g1, g2 = dict(tree_flatten(g1)), dict(tree_flatten(g2))
    assert g1.keys() == g2.keys() and rel(l2.item(), l1.item()) <= TOL
    for k in g1:
        assert rel(np.array(g2[k]), np.array(g1[k])) <= TOL, k
    assert any(np.abs(np.array(g)).max() > 0 for k, g in g1.items() if "lora_a" in k)


@pytest.mark.parametrize("scope", [None, "mlp", "block"])
def test_lean_backward_gives_the_same_gradients(tiny_pair, scope):
    """lean_backward (frozen norms without their weight gradient, SwiGLU recomputing its sigmoid), alone and
    under checkpointing, compiled: same loss and gradients; a trainable norm keeps its gradient; the teacher
    of the same architecture is not touched."""
    from conch_dna.training.kd.lean import checkpoint_blocks, lean_backward

    teacher, plain, lean = teacher_and_twin_students(tiny_pair, trainable_norm=True)
    assert lean_backward(lean) == {"norms": 2 * len(lean.layers), "mlps": len(lean.layers)}
    assert lean_backward(lean) == {"norms": 0, "mlps": 0}  # once is enough
    assert type(lean.model.norm) is nn.RMSNorm and type(lean.layers[0].input_layernorm).__name__ == "_RMSNormWeightAfter"
    assert all(type(m).__name__ in ("RMSNorm", "MLP") for b in teacher.layers for m in (b.input_layernorm, b.mlp))
    if scope:
        checkpoint_blocks(lean, 1, scope)
    tokens, mask = batch(6)
    f = lambda m: pack(fused_objective(m, teacher, tokens, mask, chunking=Chunking(16)))  # noqa: E731
    f_compiled = lambda m: pack(fused_objective(m, teacher, tokens, mask, chunking=Chunking(16, compiled=True)))  # noqa: E731
    (l1, _), g1 = nn.value_and_grad(plain, f)(plain)
    state = [lean.state]
    step = mx.compile(lambda: nn.value_and_grad(lean, f_compiled)(lean), inputs=state, outputs=state)
    (l2, _), g2 = step()
    g1, g2 = dict(tree_flatten(g1)), dict(tree_flatten(g2))
    assert g1.keys() == g2.keys() and "model.norm.weight" in g1 and rel(l2.item(), l1.item()) <= TOL
    for k in g1:
        assert rel(np.array(g2[k]), np.array(g1[k])) <= TOL, k


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_lean_norm_is_mlx_s_fused_norm_forward_and_the_weightless_norm_s_gradient(dtype):
    """The frozen-weight norm: the same bits as normalising without the weight and multiplying by it, forward
    and backward (so only the separate multiply goes), and as mx.fast.rms_norm with the weight, forward."""
    from conch_dna.training.kd.lean import _rms_norm_frozen_weight

    k = mx.random.split(mx.random.key(3), 3)
    x = (mx.random.normal((2, 5, 96), key=k[0]) * 2 + 0.3).astype(dtype)
    w = mx.random.uniform(0.5, 1.5, (96,), key=k[1]).astype(dtype)
    cot = mx.random.normal((2, 5, 96), key=k[2]).astype(dtype)
    (got,), (dx,) = mx.vjp(lambda a: _rms_norm_frozen_weight(1e-5)(a, w), [x], [cot])
    (want,), (want_dx,) = mx.vjp(lambda a: mx.fast.rms_norm(a, None, 1e-5) * w, [x], [cot])
    assert got.dtype == dx.dtype == dtype
    assert mx.array_equal(got, want).item() and mx.array_equal(dx, want_dx).item()
    assert mx.array_equal(got, mx.fast.rms_norm(x, w, 1e-5)).item()
    assert _rms_norm_frozen_weight(1e-5) is _rms_norm_frozen_weight(1e-5)  # one function per eps


def test_rope_kernel_gives_the_same_gradients_and_leaves_the_teacher_as_it_was(tiny_pair):
    """`kernels.use_rope_kernel` (the student, as `build_step` does) and `kernels.rope_kernel` (the teacher,
    for one pass): same loss and gradients, compiled, under block checkpointing; the teacher's modules are
    nn.RoPE again afterwards, also when the pass raises. On the CPU this is nn.RoPE's own path (the kernel's
    exactness is tests/test_kernels.py's, on the GPU)."""
    from conch_dna.training.kd import kernels
    from conch_dna.training.kd.fused import TeacherStates, model_parts, teacher_hidden
    from conch_dna.training.kd.lean import checkpoint_blocks

    teacher, plain, fast = teacher_and_twin_students(tiny_pair)
    assert len(kernels.use_rope_kernel(fast)) == len(fast.layers)
    assert type(fast.layers[0].self_attn.rope) is kernels.KernelRoPE and kernels.use_rope_kernel(fast) == []
    checkpoint_blocks(fast, 1, "block")
    tokens, mask = batch(7)
    body, head = model_parts(teacher)
    with kernels.teacher_kernels(teacher):
        assert type(teacher.layers[0].self_attn.rope) is kernels.KernelRoPE
        states = TeacherStates(teacher_hidden(body, tokens, 4096), head)
    assert all(type(b.self_attn.rope) is nn.RoPE for b in teacher.layers)
    with pytest.raises(RuntimeError, match="boom"), kernels.teacher_kernels(teacher):
        raise RuntimeError("boom")
    assert all(type(b.self_attn.rope) is nn.RoPE for b in teacher.layers)
    f = lambda m: pack(fused_objective(m, teacher, tokens, mask, chunking=Chunking(16)))  # noqa: E731
    (l1, _), g1 = nn.value_and_grad(plain, f)(plain)
    state = [fast.state]
    step = mx.compile(lambda t: nn.value_and_grad(fast, lambda m: pack(fused_objective(
        m, TeacherStates(t, head), tokens, mask, chunking=Chunking(16, compiled=True))))(fast), inputs=state, outputs=state)
    (l2, _), g2 = step(states.hidden)
    g1, g2 = dict(tree_flatten(g1)), dict(tree_flatten(g2))
    assert g1.keys() == g2.keys() and rel(l2.item(), l1.item()) <= TOL
    for k in g1:
        assert rel(np.array(g2[k]), np.array(g1[k])) <= TOL, k


@pytest.mark.parametrize("setting", ["auto", "on", "off"])
def test_build_step_applies_lean_backward_as_configured(tiny_pair, setting):
    from conch_dna.training.kd.lean import use_lean_backward
    from conch_dna.training.kd.trainer import build_step

    student, _ = load_model(tiny_pair[1], F32)
    config = KDConfig(lora={"rank": 4}, lean_backward=setting)
    apply_lora(student, config)
    build_step(student, config, None)
    on = setting == "on" or (setting == "auto" and not ON_CPU)
    assert use_lean_backward(config) == on
    assert type(student.layers[0].mlp).__name__.startswith("Recomputing") == on
    assert (type(student.layers[0].input_layernorm) is nn.RMSNorm) == (not on)
    assert type(student.layers[0].self_attn.rope).__name__ == "KernelRoPE"  # whatever the setting


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_kernels_swiglu_matches_autodiff(dtype):
    from mlx_lm.models.activations import swiglu

    from conch_dna.training.kd.kernels import swiglu as swiglu_recomputed

    gate, up, cot = (mx.random.normal((3, 5, 40), key=mx.random.key(i)).astype(dtype) * 3 for i in range(3))
    out_ref, (dg_ref, du_ref) = mx.vjp(lambda g, u: nn.silu(g) * u, [gate, up], [cot])
    out, (dg, du) = mx.vjp(swiglu_recomputed, [gate, up], [cot])
    assert dg.dtype == du.dtype == out[0].dtype == dtype
    tol = 1e-6 if dtype == mx.float32 else 1e-2  # bf16: ours computes in float32, autodiff in bf16
    for a, b in ((out[0], out_ref[0]), (out[0], swiglu(gate, up)), (dg, dg_ref), (du, du_ref)):
        assert rel(np.array(a.astype(F32)), np.array(b.astype(F32))) <= tol


def test_checkpoint_scope_errors_are_specific(tiny_pair):
    from types import SimpleNamespace

    from conch_dna.training.kd.lean import checkpoint_blocks

    student, _ = load_model(tiny_pair[1])
    with pytest.raises(ValueError, match="'block' or 'mlp', not 'attention'"):
        checkpoint_blocks(student, 1, "attention")
    with pytest.raises(ValueError, match="needs blocks with an `mlp` sub-module; Linear has none"):
        checkpoint_blocks(SimpleNamespace(layers=[nn.Linear(2, 2)]), 1, "mlp")
    with pytest.raises(ValueError, match="grad_checkpoint_scope"):
        KDConfig(grad_checkpoint_scope="attention")
    with pytest.raises(ValueError, match="grad_checkpoint_whole_blocks only applies with grad_checkpoint_scope = 'mlp'"):
        KDConfig(grad_checkpoint=True, grad_checkpoint_whole_blocks=3)  # the default scope is 'block'
    assert KDConfig(grad_checkpoint=True, grad_checkpoint_scope="mlp", grad_checkpoint_whole_blocks=3)


def test_teacher_hidden_in_groups_of_rows_equals_one_pass(models):
    from conch_dna.training.kd.fused import model_parts, teacher_hidden

    teacher, _ = models
    body, _ = model_parts(teacher)
    tokens, _ = batch(7, B=5, L=12)
    whole = np.array(body(tokens))
    for wait in (True, False):  # group by group, or (teacher prefetch) one pass queued whole, whatever max_tokens
        for max_tokens in (1, 12, 30, 10_000):  # 1 row (also below one row), 1 row, 2 rows, all rows
            got = teacher_hidden(body, tokens, max_tokens, wait)
            assert got.shape == whole.shape and rel(np.array(got), whole) <= (1e-6 if ON_CPU else TOL), (wait, max_tokens)


@pytest.mark.parametrize("no_repeat", [False, True])
@pytest.mark.parametrize("ul", [0.0, 0.5])
@pytest.mark.parametrize("alpha", [0.0, 0.7, 1.0])
def test_loop_terms_match_reference(models, alpha, ul, no_repeat):
    """With the unlikelihood term and the no-repeat teacher the fused loss gives the reference's loss, parts
    and gradients, for dense and sparse teacher targets."""
    teacher, students = models
    tokens, mask = batch(4)
    loop = mx.array([[5, 6, 7, 8] * 6, [9, 10, 11] * 8])  # repeated 4-grams in both rows' responses
    tokens = mx.where(mx.arange(24)[None, :] >= 6, loop, tokens)
    spec = LossSpec(alpha, 2.0, unlikelihood=ul, no_repeat_teacher=no_repeat)
    ref = lambda m: pack(kd_objective(m(tokens), teacher(tokens), tokens, mask, spec))  # noqa: E731
    plain = kd_objective(students["tied"](tokens), teacher(tokens), tokens, mask, LossSpec(alpha, 2.0))
    out = ref(students["tied"])[1]
    assert (out["ul"].item() > 0) == (ul > 0)
    if alpha > 0:
        assert (abs(out["kd"].item() - plain["kd"].item()) > 1e-5) == no_repeat
    compare(students["tied"], ref, lambda m: pack(fused_objective(m, teacher, tokens, mask, spec, Chunking(10))))
    sp = topk_targets(teacher(tokens), 16)
    compare(students["tied"], lambda m: pack(kd_objective(m(tokens), sp, tokens, mask, spec)),
            lambda m: pack(fused_objective(m, sp, tokens, mask, spec, Chunking(7))))
