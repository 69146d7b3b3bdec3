"""The CORTEX neuron registry: persistence, validation, promote/rollback, quality gate, corrupt manifest."""

import json
import subprocess
import sys

import pytest

from conch_dna.cortex import (
    AdapterMismatchError,
    DuplicateAdapterError,
    NeuronNotFoundError,
    NeuronRegistry,
    QualityGateError,
    RegistryError,
)
from conch_dna.models.tiny import build_tiny_model
from conch_dna.training.kd import TrueKnowledgeDistiller, signals
from tests.conftest import PROMPTS


@pytest.fixture(scope="module")
def adapters(tiny_pair, tmp_path_factory):
    """Three distinct adapters for the tiny student, and one for a differently shaped base."""
    from conch_dna.training.kd import KDConfig

    teacher, student = tiny_pair
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for i, seed in enumerate((0, 1, 2)):
        cfg = KDConfig(iters=2, batch_size=2, seed=seed, output_dir=str(root / f"run{i}"), max_seq_length=64,
                       learning_rate=5e-3, generation={"max_new_tokens": 8, "batch_size": 8})
        out[i] = TrueKnowledgeDistiller(str(teacher), str(student), cfg).distill_domain("thinking", PROMPTS)
    other = build_tiny_model(root / "other_base", num_layers=2, hidden_size=48, num_heads=2, num_kv_heads=1,
                             intermediate_size=64, seed=3, tokenizer_from=teacher)
    cfg = KDConfig(iters=1, batch_size=2, output_dir=str(root / "other"), max_seq_length=64,
                   generation={"max_new_tokens": 8, "batch_size": 8})
    out["other"] = TrueKnowledgeDistiller(str(teacher), str(other), cfg).distill_domain("thinking", PROMPTS)
    return out


def test_register_persist_and_reload_in_a_fresh_process(tiny_pair, adapters, tmp_path):
    _, student = tiny_pair
    reg = NeuronRegistry(tmp_path / "reg", base_model=student)
    seen = []

    def on_registered(sender, **kw):
        seen.append((sender, kw))

    with signals.adapter_registered.connected_to(on_registered):
        v1 = reg.register("thinking", adapters[0].adapter_path, metrics={"val_kd": 2.0}, teacher="t", student=str(student))
    assert v1.version == 1 and reg.active("thinking") == v1
    assert seen[0][0] is reg and seen[0][1]["neuron"] == "thinking" and seen[0][1]["version"] == 1 and seen[0][1]["active"]
    code = (
        "import conch_dna, json, sys; from conch_dna.cortex import NeuronRegistry;"
        f"r = NeuronRegistry({str(tmp_path / 'reg')!r}); v = r.active('thinking');"
        "print(json.dumps([v.version, v.sha256, v.metrics]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [1, v1.sha256, {"val_kd": 2.0}]
    # The registered copy is immutable: retraining into the run folder does not change it.
    assert v1.path != adapters[0].adapter_path


def test_duplicate_and_mismatched_adapters_are_rejected(tiny_pair, adapters, tmp_path):
    _, student = tiny_pair
    reg = NeuronRegistry(tmp_path / "reg", base_model=student)
    reg.register("thinking", adapters[0].adapter_path)
    with pytest.raises(DuplicateAdapterError, match="already version 1"):
        reg.register("thinking", adapters[0].adapter_path)
    with pytest.raises(AdapterMismatchError, match="does not fit the base student"):
        reg.register("thinking", adapters["other"].adapter_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterMismatchError, match="missing"):
        reg.register("thinking", broken)
    (broken / "adapters.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(AdapterMismatchError, match="corrupt or truncated"):
        reg.register("thinking", broken)
    assert [v.version for v in reg.versions("thinking")] == [1]  # nothing half-registered


def test_promote_rollback_and_quality_gate(tiny_pair, adapters, tmp_path):
    _, student = tiny_pair
    reg = NeuronRegistry(tmp_path / "reg", base_model=student, quality_gate=True)
    reg.register("thinking", adapters[0].adapter_path, metrics={"val_kd": 2.0})
    worse = reg.register("thinking", adapters[1].adapter_path, metrics={"val_kd": 3.0})
    assert reg.active("thinking").version == 1  # the gate kept v2 inactive
    with pytest.raises(QualityGateError, match="worse"):
        reg.promote("thinking", worse.version)
    better = reg.register("thinking", adapters[2].adapter_path, metrics={"val_kd": 1.5})
    assert reg.active("thinking") == better
    assert reg.rollback("thinking").version == 1 and reg.active("thinking").version == 1
    with pytest.raises(RegistryError, match="no earlier active version"):
        reg.rollback("thinking")
    ungated = NeuronRegistry(tmp_path / "reg", base_model=student)
    assert ungated.promote("thinking", 2).version == 2 and ungated.active("thinking").version == 2
    with pytest.raises(NeuronNotFoundError):
        ungated.promote("thinking", 99)
    with pytest.raises(NeuronNotFoundError):
        ungated.versions("nobody")


def test_corrupt_manifest_is_detected_and_state_kept(tiny_pair, adapters, tmp_path):
    _, student = tiny_pair
    reg = NeuronRegistry(tmp_path / "reg", base_model=student)
    v1 = reg.register("thinking", adapters[0].adapter_path)
    manifest = tmp_path / "reg" / "registry.json"
    good = manifest.read_text()
    for nonsense in ("{ not json", json.dumps({"format": 1, "neurons": {"thinking": {"active": "yes"}}}), "[]"):
        manifest.write_text(nonsense)
        with pytest.raises(RegistryError, match="corrupt or was edited"):
            reg.reload()
        assert reg.active("thinking") == v1  # previous state kept
        with pytest.raises(RegistryError):
            reg.register("thinking", adapters[1].adapter_path)  # never overwrites a file it cannot read
        assert manifest.read_text() == nonsense
        with pytest.raises(RegistryError, match="corrupt"):
            NeuronRegistry(tmp_path / "reg")
    manifest.write_text(good)
    reg.reload()
    assert reg.active("thinking") == v1
