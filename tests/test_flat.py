"""The trainer's update over one vector (`flat.FlatLayout`, `update.make_update`): the same steps as mlx's
optimizer over each parameter, a few kernels however many LoRA matrices, checkpoints per parameter."""
import io
import re

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from conch_dna.training.kd import KDConfig
from conch_dna.training.kd.flat import FlatLayout
from conch_dna.training.kd.trainer import apply_lora
from conch_dna.training.kd.update import (
    FLAT_STATE_KEY,
    build_optimizer,
    flat_optimizer_state,
    make_update,
    per_parameter_state,
)


def lora_student(layers: int = 3):
    from mlx_lm.models import qwen2

    args = qwen2.ModelArgs.from_dict(dict(model_type="qwen2", hidden_size=32, num_hidden_layers=layers, intermediate_size=64,
                                          num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=50,
                                          tie_word_embeddings=True))
    mx.random.seed(0)
    model = qwen2.Model(args)
    apply_lora(model, KDConfig(lora={"rank": 4, "keys": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                         "self_attn.o_proj"]}))
    # LoRA's B starts at zero: give every matrix values so that the steps below move all of them differently
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.1, model.trainable_parameters()))
    mx.eval(model.parameters())
    return model


def test_layout_round_trip_views_and_refusals():
    tree = {"a": mx.arange(6, dtype=mx.float32).reshape(2, 3), "b": [mx.ones((4,), dtype=mx.bfloat16)]}
    layout = FlatLayout.of(tree)
    flat = layout.flatten(tree)
    assert flat.dtype == mx.float32 and flat.shape == (10,) and layout.sizes() == [6, 4]
    back = layout.unflatten(flat * 2)
    assert back["a"].shape == (2, 3) and back["b"][0].dtype == mx.bfloat16
    assert np.array_equal(np.array(back["a"]), np.arange(6).reshape(2, 3) * 2)
    with pytest.raises(ValueError, match="shape"):
        layout.flatten({"a": mx.zeros((3, 2)), "b": [mx.zeros((4,))]})
    with pytest.raises(ValueError, match="not this layout's"):
        layout.flatten({"a": mx.zeros((2, 3))})


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_flat_update_takes_the_steps_of_mlx_optimizer_per_parameter(compiled, max_grad_norm):
    """Three steps with weight decay and (where 0.05) clipping that binds: the same parameters and optimizer
    state as mlx's AdamW over each parameter, with optim.clip_grad_norm, to float32 rounding."""
    ours, ref = lora_student(), lora_student()
    config = KDConfig(learning_rate=1e-2, weight_decay=0.1, max_grad_norm=max_grad_norm)
    opt, ref_opt = build_optimizer(config), build_optimizer(config)
    opt.init(ours.trainable_parameters())
    ref_opt.init(ref.trainable_parameters())
    update = make_update(ours, opt, max_grad_norm, compiled)
    layout = FlatLayout.of(ours.trainable_parameters())
    for step in range(3):
        mx.random.seed(10 + step)
        grads = tree_map(lambda p: mx.random.normal(p.shape), ours.trainable_parameters())
        n = mx.array(4.0)
        norm = update(layout.flatten(grads) * n, mx.array(1.0), n)
        ref_grads = grads
        ref_norm = mx.sqrt(sum(g.square().sum() for _, g in tree_flatten(grads)))
        if max_grad_norm > 0:
            ref_grads, ref_norm = optim.clip_grad_norm(grads, max_grad_norm)
        ref_opt.update(ref, ref_grads)
        mx.eval(ours.parameters(), opt.state, ref.parameters(), ref_opt.state)
        assert norm.item() == pytest.approx(ref_norm.item(), rel=1e-5)
    ours_p, ref_p = dict(tree_flatten(ours.trainable_parameters())), dict(tree_flatten(ref.trainable_parameters()))
    assert ours_p.keys() == ref_p.keys() and len(ours_p) == 24
    for k in ref_p:
        np.testing.assert_allclose(np.array(ours_p[k]), np.array(ref_p[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    state, ref_state = dict(tree_flatten(per_parameter_state(opt.state, layout))), dict(tree_flatten(ref_opt.state))
    assert state.keys() == ref_state.keys()
    for k in ref_state:
        np.testing.assert_allclose(np.array(state[k]), np.array(ref_state[k]), rtol=1e-5, atol=1e-7, err_msg=k)


def test_optimizer_state_flattens_and_back_exactly():
    model = lora_student()
    opt = build_optimizer(KDConfig())
    opt.init(model.trainable_parameters())
    layout = FlatLayout.of(model.trainable_parameters())
    opt.state = tree_map(lambda a: mx.random.normal(a.shape) if a.ndim else a, opt.state)  # m, v not zeros
    before = {k: np.array(v) for k, v in tree_flatten(opt.state)}
    flat = flat_optimizer_state(opt.state, layout)
    assert set(flat[FLAT_STATE_KEY]) == {"m", "v"} and flat[FLAT_STATE_KEY]["m"].shape == (sum(layout.sizes()),)
    assert {k for k in flat if k != FLAT_STATE_KEY} == {"step", "learning_rate"}
    assert flat_optimizer_state(flat, layout) is flat
    after = {k: np.array(v) for k, v in tree_flatten(per_parameter_state(flat, layout))}
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[k], before[k]) for k in before)


def kernels_in(*outputs) -> int:
    """Operations in the graph that computes `outputs` that run a kernel (views and broadcasts do not)."""
    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    ops = re.findall(r'label ?= ?"([A-Za-z]+)', dot.getvalue())
    return sum(op not in ("Broadcast", "Reshape", "Slice", "Squeeze", "ExpandDims") for op in ops)


def test_compiled_update_runs_a_few_kernels_however_many_matrices():
    """What the flat update is for: with 8 or 24 blocks (64 or 192 LoRA matrices) the compiled update queues
    the same handful of kernels; over each parameter it was ~10 per matrix."""
    counts = []
    for layers in (2, 6):
        model = lora_student(layers)
        opt = build_optimizer(KDConfig())
        opt.init(model.trainable_parameters())
        update = make_update(model, opt, 1.0, compiled=True)
        grads = FlatLayout.of(model.trainable_parameters()).flatten(model.trainable_parameters())
        mx.eval(grads)
        mx.eval(update(grads, mx.array(1.0), mx.array(2.0)), model.parameters(), opt.state)  # gathers the state once
        norm = update(grads, mx.array(1.0), mx.array(2.0))
        counts.append(kernels_in(norm, opt.state[FLAT_STATE_KEY]["m"], opt.state[FLAT_STATE_KEY]["v"],
                                 *(v for _, v in tree_flatten(model.trainable_parameters()))))
        mx.eval(norm, model.parameters(), opt.state)
    assert counts[0] == counts[1] and counts[0] < 20, counts


def test_checkpoint_keeps_the_optimizer_state_per_parameter(tmp_path):
    from conch_dna.training.kd.checkpoints import load_checkpoint, save_checkpoint

    model = lora_student()
    opt = build_optimizer(KDConfig())
    opt.init(model.trainable_parameters())
    update = make_update(model, opt, 1.0, compiled=False)
    layout = FlatLayout.of(model.trainable_parameters())
    update(layout.flatten(model.trainable_parameters()), mx.array(1.0), mx.array(1.0))
    mx.eval(model.parameters(), opt.state)
    ckpt = save_checkpoint(model, opt, tmp_path, 1, {}, {"fine_tune_type": "lora"}, keep=2)
    on_disk = mx.load(str(ckpt / "optimizer.safetensors"))
    assert not any(FLAT_STATE_KEY in k for k in on_disk) and "step" in on_disk
    assert {k.rsplit(".", 1)[0] for k in on_disk if k.endswith(".m")} == set(layout.keys)
    fresh, fresh_opt = lora_student(), build_optimizer(KDConfig())
    fresh_opt.init(fresh.trainable_parameters())
    load_checkpoint(fresh, fresh_opt, ckpt)
    resumed = flat_optimizer_state(fresh_opt.state, layout)
    for name in ("m", "v"):
        assert np.array_equal(np.array(resumed[FLAT_STATE_KEY][name]), np.array(opt.state[FLAT_STATE_KEY][name]))
    for (k, a), (_, b) in zip(tree_flatten(fresh.trainable_parameters()), tree_flatten(model.trainable_parameters())):
        assert np.array_equal(np.array(a), np.array(b)), k
