"""Neurons are judged on enough held-out prompts, with intervals over prompts, and the quality gate decides on
the intervals: the held-out sets, the bootstrap, and the gate's decisions."""

import math
import re

import numpy as np
import pytest

from conch_dna.cortex.registry import REPETITION_MARGIN, NeuronRegistry, loops, unusable_figures, worse_than
from conch_dna.training.kd.domains import load_domains, load_held_out
from conch_dna.training.kd.evaluate import generation_metrics, pooled_interval


def norm(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def test_every_domain_has_32_held_out_prompts_never_trained_on():
    domains = load_domains()
    trained = {norm(p) for prompts in domains.values() for p in prompts}
    for name in domains:
        held = [norm(p) for p in load_held_out(name)]
        assert len(held) >= 32, name
        assert len(set(held)) == len(held), f"{name}: a held-out prompt is listed twice"
        assert not trained & set(held), f"{name}: held-out prompts that are training prompts: {trained & set(held)}"


def test_the_interval_holds_the_figure_and_narrows_with_more_prompts():
    rng = np.random.default_rng(0)
    tokens = rng.integers(20, 64, size=128)
    kl = tokens * rng.gamma(2.0, 0.05, size=128)
    point = kl.sum() / tokens.sum()
    low, high = pooled_interval(kl, tokens)
    assert low < point < high
    few = pooled_interval(kl[:32], tokens[:32])
    ratio = (few[1] - few[0]) / (high - low)
    assert 1.4 < ratio < 3.0  # ~ sqrt(128 / 32) = 2
    assert pooled_interval(kl, tokens) == (low, high)  # seeded: the same figures give the same interval
    assert pooled_interval(tokens * 0.25, tokens) == pytest.approx((0.25, 0.25))  # no spread, no width


def test_the_interval_covers_the_truth_about_nine_times_in_ten():
    """Draws of 32 prompts from a known population: the 90% interval holds the population's figure in about
    90% of them (a wrong bootstrap, e.g. over tokens instead of prompts, covers far less)."""
    rng = np.random.default_rng(1)
    per_prompt_rate = rng.beta(2, 8, size=5000)  # each prompt's own repetition rate
    lengths = rng.integers(30, 61, size=5000)
    truth = (per_prompt_rate * lengths).sum() / lengths.sum()
    covered = 0
    for trial in range(200):
        pick = rng.integers(0, 5000, size=32)
        repeats = rng.binomial(lengths[pick], per_prompt_rate[pick])
        low, high = pooled_interval(repeats, lengths[pick], resamples=1000, seed=trial)
        covered += low <= truth <= high
    assert 0.82 <= covered / 200 <= 0.97, covered


def test_a_paired_difference_uses_the_same_prompts():
    rng = np.random.default_rng(2)
    grams = rng.integers(40, 61, size=32)
    teacher = rng.binomial(grams, 0.06)
    assert pooled_interval(teacher, grams, (teacher, grams)) == (0.0, 0.0)
    neuron = teacher + rng.binomial(grams, 0.10)  # repeats ~0.10 more on every prompt
    low, high = pooled_interval(neuron, grams, (teacher, grams))
    unpaired = [pooled_interval(x, grams) for x in (neuron, teacher)]
    assert 0.05 < low < 0.10 < high < 0.15
    assert high - low < (unpaired[0][1] - unpaired[0][0]) + (unpaired[1][1] - unpaired[1][0])
    with pytest.raises(ValueError, match="one numerator and one denominator per prompt"):
        pooled_interval([1, 2], [3])


def judged(excess: tuple, kl=(0.08, 0.07, 0.09), agreement=(0.87, 0.86, 0.88), repetition=(0.05, 0.04, 0.06)) -> dict:
    m = {"held_out_teacher_repetition": 0.05}
    for name, (point, low, high) in {"kl": kl, "agreement": agreement, "repetition": repetition,
                                     "repetition_excess": excess}.items():
        m.update({f"held_out_{name}": point, f"held_out_{name}_low": low, f"held_out_{name}_high": high})
    return m


def test_the_gate_passes_a_neuron_only_when_its_whole_interval_is_within_the_margin():
    assert loops(judged((0.0, -0.02, 0.03))) is None
    sure = loops(judged((0.12, 0.08, 0.16)))
    assert sure.startswith("loops") and "+0.080 to +0.160" in sure
    unsure = loops(judged((0.04, 0.01, 0.07)))  # the point is within the margin, the interval is not
    assert unsure.startswith("may loop") and f"+ {REPETITION_MARGIN}" in unsure


def test_the_gate_refuses_as_worse_only_what_is_clearly_worse():
    old = judged((0.0, -0.02, 0.02))
    # worse by more than the old fixed tolerance (0.02) but within the noise: not refused
    noisy = judged((0.0, -0.02, 0.02), kl=(0.105, 0.075, 0.135))
    assert worse_than(noisy, old) is None
    clearly = judged((0.0, -0.02, 0.02), kl=(0.15, 0.13, 0.17), agreement=(0.80, 0.79, 0.81))
    reason = worse_than(clearly, old)
    assert "kl 0.150" in reason and "agreement 0.800" in reason
    # an old version judged without intervals: the fixed tolerance decides
    plain_old = {k: v for k, v in old.items() if not k.endswith(("_low", "_high")) and "excess" not in k}
    assert "held-out KL" in worse_than(noisy, plain_old)
    broken = judged((0.0, math.nan, 0.02))
    assert "held_out_repetition_excess_low" in unusable_figures(broken)


def test_the_registry_keeps_an_undecided_neuron_inactive(tiny_pair, tmp_path):
    from tests.conftest import random_adapter

    _, student = tiny_pair
    registry = NeuronRegistry(tmp_path / "registry", base_model=student, quality_gate=True)
    good = registry.register("memory", random_adapter(student, tmp_path / "a", seed=0), metrics=judged((0.0, -0.02, 0.03)))
    maybe = registry.register("memory", random_adapter(student, tmp_path / "b", seed=1), metrics=judged((0.04, 0.01, 0.07)))
    assert registry.active("memory") == good and maybe.version == 2


def test_generation_metrics_give_intervals(tiny_pair):
    from conch_dna.models import load_model

    teacher_dir, student_dir = tiny_pair
    teacher, tokenizer = load_model(str(teacher_dir))
    student, _ = load_model(str(student_dir))
    prompts = load_held_out("memory")[:6]
    g = generation_metrics(student, teacher, tokenizer, prompts, max_new_tokens=12)
    for name in ("kl", "agreement", "repetition", "repetition_excess"):
        assert g[f"{name}_low"] <= g[name] + 1e-9 and g[name] <= g[f"{name}_high"] + 1e-9, name
    assert g["kl_high"] > g["kl_low"] and g["prompts"] == 6
