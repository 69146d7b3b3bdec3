"""The registry and CORTEX trust nothing they did not write: every file of a version is hashed, versions live
only inside the registry, a registry serves the one base its manifest names, and figures that cannot be
judged never pass the quality gate."""

import json
import math
import shutil
import subprocess
import sys

import pytest

from conch_dna.cortex import AdapterMismatchError, Cortex, NeuronRegistry, RegistryError
from conch_dna.cortex.registry import HISTORY_LIMIT, MANIFEST
from conch_dna.training.kd import KDConfig, TrueKnowledgeDistiller
from tests.conftest import PROMPTS, cli_config

GOOD = {"held_out_kl": 0.10, "held_out_agreement": 0.85, "held_out_repetition": 0.05,
        "held_out_teacher_repetition": 0.06, "val_kd": 1.0}


@pytest.fixture(scope="module")
def trained(tiny_pair, tmp_path_factory):
    """Two distinct adapters for the tiny student."""
    teacher, student = tiny_pair
    root = tmp_path_factory.mktemp("trust")
    out = []
    for seed in (0, 1):
        cfg = KDConfig(iters=1, batch_size=2, seed=seed, output_dir=str(root / f"run{seed}"), max_seq_length=64,
                       learning_rate=5e-3, eval_max_new_tokens=0, generation={"max_new_tokens": 8, "batch_size": 8})
        out.append(TrueKnowledgeDistiller(str(teacher), str(student), cfg).distill_domain("thinking", PROMPTS).adapter_path)
    return out


def edit_manifest(root, change):
    data = json.loads((root / MANIFEST).read_text())
    change(data)
    (root / MANIFEST).write_text(json.dumps(data))


def test_every_file_of_a_version_is_checked_before_it_is_served(tiny_pair, trained, tmp_path):
    _, student = tiny_pair
    reg = NeuronRegistry(tmp_path / "reg", base_model=str(student))
    v = reg.register("thinking", trained[0], metrics={"val_kd": 1.0})
    assert set(v.files) == {"adapters.safetensors", "adapter_config.json"} and v.path == "thinking/v0001"
    cortex = Cortex(reg)
    assert cortex.generate("thinking", "hello", max_tokens=3).version == 1
    config = tmp_path / "reg" / "thinking" / "v0001" / "adapter_config.json"
    edited = json.loads(config.read_text())
    edited["lora_parameters"]["scale"] = -500.0
    config.write_text(json.dumps(edited))
    with pytest.raises(AdapterMismatchError, match="adapter_config.json"):
        Cortex(NeuronRegistry(tmp_path / "reg")).generate("thinking", "hello", max_tokens=3)


def test_a_file_replaced_by_a_link_is_refused(tiny_pair, trained, tmp_path):
    _, student = tiny_pair
    reg = NeuronRegistry(tmp_path / "reg", base_model=str(student))
    reg.register("thinking", trained[0], metrics={"val_kd": 1.0})
    target = tmp_path / "reg" / "thinking" / "v0001" / "adapters.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copyfile(target, outside)
    target.unlink()
    target.symlink_to(outside)  # same bytes, but not a file of the registry
    with pytest.raises(AdapterMismatchError, match="not a regular file"):
        reg.verify(reg.active("thinking"))


def test_paths_in_the_manifest_are_never_followed_and_a_copied_registry_serves_its_own_files(tiny_pair, trained, tmp_path):
    _, student = tiny_pair
    original = tmp_path / "reg"
    reg = NeuronRegistry(original, base_model=str(student))
    reg.register("thinking", trained[0], metrics={"val_kd": 1.0})
    edit_manifest(original, lambda d: d["neurons"]["thinking"]["versions"][0].update(path="../../../etc"))
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    reg2 = NeuronRegistry(copy)
    assert reg2.verify(reg2.active("thinking")) == copy / "thinking" / "v0001"
    assert Cortex(reg2).generate("thinking", "hi", max_tokens=2).version == 1


def test_a_registry_serves_the_base_its_manifest_names(tiny_pair, trained, tmp_path):
    teacher, student = tiny_pair
    reg = NeuronRegistry(tmp_path / "reg", base_model=str(student))
    reg.register("thinking", trained[0], metrics={"val_kd": 1.0})
    opened = NeuronRegistry(tmp_path / "reg")  # no base given: the manifest's
    assert opened.base_model == str(student)
    assert Cortex(opened).base_model_id == str(student)
    with pytest.raises(RegistryError, match="holds adapters of"):
        NeuronRegistry(tmp_path / "reg", base_model=str(teacher))
    with pytest.raises(RegistryError, match="holds adapters of"):
        Cortex(opened, str(teacher))
    with pytest.raises(AdapterMismatchError, match="trained on the student"):
        opened.register("thinking", trained[1], metrics={"val_kd": 0.5}, student=str(teacher))


def test_the_cli_refuses_a_registry_of_another_base_before_training(tiny_pair, trained, tmp_path):
    teacher, student = tiny_pair
    NeuronRegistry(tmp_path / "reg", base_model=str(student)).register("thinking", trained[0], metrics={"val_kd": 1.0})
    (tmp_path / "kd.toml").write_text(cli_config(batch_size=2, iters=1, gen_batch=4))
    run = subprocess.run([sys.executable, "-m", "conch_dna.training.kd", "--domain", "thinking", "--teacher", str(teacher),
                          "--student", str(teacher), "--config", str(tmp_path / "kd.toml"), "--registry",
                          str(tmp_path / "reg"), "--output", str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 2 and "holds adapters of" in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [math.nan, math.inf, None, "0.1"])
def test_figures_that_cannot_be_judged_never_pass_the_gate_nor_block_later_versions(tiny_pair, trained, tmp_path, bad):
    _, student = tiny_pair
    reg = NeuronRegistry(tmp_path / "reg", base_model=str(student), quality_gate=True)
    broken = reg.register("thinking", trained[0], metrics={**GOOD, "held_out_kl": bad})
    assert reg.active("thinking") is None, broken
    good = reg.register("thinking", trained[1], metrics=GOOD)
    assert reg.active("thinking") == good
    with pytest.raises(Exception, match="cannot be judged"):
        reg.promote("thinking", broken.version)


def test_leftovers_are_cleaned_history_is_bounded_and_rollback_after_promoting_the_active(tiny_pair, trained, tmp_path):
    _, student = tiny_pair
    root = tmp_path / "reg"
    reg = NeuronRegistry(root, base_model=str(student))
    v1 = reg.register("thinking", trained[0], metrics={"val_kd": 1.0})
    v2 = reg.register("thinking", trained[1], metrics={"val_kd": 0.9})
    for i in range(3):  # what kills during manifest writes leave behind
        (root / f".{MANIFEST}.dead{i}.json").write_text("{")
    reg.promote("thinking", v2.version)  # already active: nothing changes
    assert not list(root.glob(f".{MANIFEST}.*.json"))
    assert reg.rollback("thinking") == v1
    for _ in range(HISTORY_LIMIT):
        reg.promote("thinking", v2.version)
        reg.promote("thinking", v1.version)
    history = json.loads((root / MANIFEST).read_text())["neurons"]["thinking"]["history"]
    assert len(history) == HISTORY_LIMIT
    assert reg.rollback("thinking") == v2


def test_a_read_only_registry_is_refused_before_any_work(tiny_pair, tmp_path):
    teacher, student = tiny_pair
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        (tmp_path / "kd.toml").write_text(cli_config(batch_size=2, iters=1, gen_batch=4))
        run = subprocess.run([sys.executable, "-m", "conch_dna.training.kd", "--domain", "thinking", "--teacher",
                              str(teacher), "--student", str(student), "--config", str(tmp_path / "kd.toml"),
                              "--registry", str(ro), "--output", str(tmp_path / "out")], capture_output=True, text=True)
        assert run.returncode == 2 and "cannot write to the registry" in run.stderr, run.stderr[-2000:]
        assert not (tmp_path / "out").exists()
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)
