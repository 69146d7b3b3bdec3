"""KDConfig sources and validation; the CLI's exit codes and messages; prompt loaders (with hypothesis)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conch_dna.training.kd import ConfigError, DataError, KDConfig, load_prompts
from conch_dna.training.kd.cli import main
from conch_dna.training.kd.domains import load_domains
from tests.conftest import PROMPTS


def test_priority_arguments_env_file_defaults(tmp_path, monkeypatch):
    f = tmp_path / "kd.toml"
    f.write_text("temperature = 3.0\nalpha = 0.4\niters = 7\n[lora]\nrank = 4\n")
    assert KDConfig.load(f).temperature == 3.0 and KDConfig.load(f).lora.rank == 4
    monkeypatch.setenv("CONCH_KD_TEMPERATURE", "5.0")
    monkeypatch.setenv("CONCH_KD_LORA__RANK", "8")
    c = KDConfig.load(f, alpha=0.9)
    assert (c.temperature, c.alpha, c.iters, c.lora.rank, c.batch_size) == (5.0, 0.9, 7, 8, 4)


def test_cli_flags_become_settings():
    from conch_dna.training.kd.cli import build_parser, overrides_from_args

    args = build_parser().parse_args(["--domain", "task", "--memory-limit-gb", "15", "--batch-size", "8"])
    assert overrides_from_args(args) == {"memory_limit_gb": 15.0, "batch_size": 8}
    args = build_parser().parse_args(["--domain", "task", "--memory-budget-gb", "16"])
    assert KDConfig.load(**overrides_from_args(args)).memory_budget_gb == 16.0
    with pytest.raises(ConfigError, match="memory_budget_gb"):
        KDConfig.load(memory_budget_gb=-1)
    args = build_parser().parse_args(["--domain", "task", "--grad-checkpoint", "mlp"])
    cfg = KDConfig.load(**overrides_from_args(args))
    assert cfg.grad_checkpoint and cfg.grad_checkpoint_scope == "mlp" and cfg.grad_checkpoint_every == 1
    with pytest.raises(SystemExit):  # argparse names the allowed choices
        build_parser().parse_args(["--domain", "task", "--grad-checkpoint", "attention"])
    args = build_parser().parse_args(["--domain", "task", "--own-answers", "off", "--unlikelihood", "1.5"])
    assert overrides_from_args(args) == {"own_answers": "off", "unlikelihood": 1.5}
    with pytest.raises(ConfigError, match="unlikelihood"):
        KDConfig.load(unlikelihood=-1)


@pytest.mark.parametrize("field,value,allowed", [("temperature", 20.0, "less than or equal to 10"),
                                                 ("temperature", 0.1, "greater than or equal to 0.5"),
                                                 ("alpha", -0.1, "greater than or equal to 0"),
                                                 ("iters", 0, "greater than or equal to 1")])
def test_out_of_range_names_field_value_and_range(field, value, allowed):
    with pytest.raises(ConfigError) as e:
        KDConfig.load(**{field: value})
    assert field in str(e.value) and str(value) in str(e.value) and allowed in str(e.value)


def test_unknown_and_malformed_toml(tmp_path):
    f = tmp_path / "kd.toml"
    f.write_text("temprature = 2.0\n")
    with pytest.raises(ConfigError, match="unknown setting 'temprature'"):
        KDConfig.load(f)
    f.write_text("[lora\nrank = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        KDConfig.load(f)
    with pytest.raises(ConfigError, match="does not exist"):
        KDConfig.load(tmp_path / "missing.toml")


def test_repo_kd_toml_equals_defaults():
    from pathlib import Path

    assert KDConfig.load(Path(__file__).parents[1] / "config" / "kd.toml") == KDConfig()


def test_prompt_files(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("first prompt\n\n  second prompt  \n")
    assert load_prompts(p) == ["first prompt", "second prompt"]
    j = tmp_path / "p.jsonl"
    j.write_text('{"prompt": "a"}\n"b"\n')
    assert load_prompts(j) == ["a", "b"]
    e = tmp_path / "e.txt"
    e.write_text("\n  \n")
    with pytest.raises(DataError, match="no prompts"):
        load_prompts(e)
    b = tmp_path / "b.txt"
    b.write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match="not UTF-8"):
        load_prompts(b)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{oops}\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        load_prompts(bad)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_prompt_loader_fuzz(tmp_path, data):
    """Any bytes: either prompts (non-empty strings) or a DataError — never another exception."""
    for name in ("f.txt", "f.jsonl"):
        p = tmp_path / name
        p.write_bytes(data)
        try:
            prompts = load_prompts(p)
        except DataError:
            continue
        assert prompts and all(isinstance(x, str) and x.strip() for x in prompts)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_config_loader_fuzz(tmp_path, text):
    """Any text as kd.toml: a config or a ConfigError — never another exception."""
    f = tmp_path / "kd.toml"
    f.write_text(text, encoding="utf-8")
    try:
        KDConfig.load(f)
    except ConfigError:
        pass


def test_domains_file_errors(tmp_path):
    f = tmp_path / "d.toml"
    f.write_text("[x]\nprompts = []\n")
    with pytest.raises(DataError, match=r"\[x\]"):
        load_domains(f)


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_trains_a_domain_from_a_prompt_file(tiny_pair, tmp_path, capsys, monkeypatch):
    from conch_dna.training.kd import distiller, memory

    teacher, student = tiny_pair
    calls = []  # MLX reads the queue bound when it first uses the GPU: the CLI sets it before any model loads
    load = distiller.load_model
    monkeypatch.setattr(memory, "bound_gpu_queue", lambda *a: calls.append(("queue bound", *a)))
    monkeypatch.setattr(distiller, "load_model", lambda *a, **k: (calls.append("model"), load(*a, **k))[1])
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(PROMPTS))
    rc = main(["--domain", "custom", "--prompts", str(pf), "--teacher", str(teacher), "--student", str(student),
               "--output", str(tmp_path / "out"), "--iters", "2", "--max-new-tokens", "8", "--max-seq-length", "64",
               "--lora-rank", "4", "--log-json", "--registry", str(tmp_path / "reg")])
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["domain"] == "custom" and (tmp_path / "out/custom/adapters.safetensors").is_file()
    assert line["registered_version"] == 1
    weights = sum(f.stat().st_size for folder in (teacher, student) for f in Path(folder).glob("*.safetensors"))
    assert calls[0] == ("queue bound", None, weights) and "model" in calls  # no budget given: MLX's default
    assert main(["--list", "--registry", str(tmp_path / "reg")]) == 0
    listing = capsys.readouterr().out
    assert "* custom" in listing and "v1" in listing
    cfg = json.loads((tmp_path / "out/custom/adapter_config.json").read_text())
    assert cfg["lora_parameters"]["rank"] == 4 and cfg["lora_parameters"]["scale"] == 2.0


@pytest.mark.parametrize("args,message", [
    (["--domain", "nope"], "unknown domain"),
    (["--domain", "thinking", "--temperature", "50"], "temperature"),
    (["--domain", "thinking", "--teacher", "/no/such/model"], "does not exist"),
    ([], "--domain NAME or --all"),
    (["--list", "--registry", "/dev/null/x"], "error"),
])
def test_cli_bad_input_exits_2(args, message, capsys, tiny_pair, tmp_path):
    rc = main(args + ["--output", str(tmp_path / "o")])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_cli_module_entry_points_are_the_same(tmp_path):
    for mod in ("conch_dna.training.kd", "conch_dna.training.true_kd"):
        out = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "--domain" in out.stdout and "--resume" in out.stdout
    out = subprocess.run([sys.executable, "scripts/distill_neurons.py", "--domain", "x", "--prompts", str(tmp_path / "missing.txt")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "not found" in out.stderr


def test_temperature_alpha_comparison_script(tiny_pair, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cmp", "benchmarks/compare_kd_settings.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    pf = tmp_path / "p.txt"
    pf.write_text("\n".join(PROMPTS))
    rc = mod.main(["--prompts", str(pf), "--teacher", str(tiny_pair[0]), "--student", str(tiny_pair[1]),
                   "--temperatures", "1", "2", "--alphas", "0", "1", "--iters", "2", "--max-new-tokens", "8",
                   "--max-seq-length", "64", "--output", str(tmp_path / "sweep"), "--json", str(tmp_path / "rows.json")])
    assert rc == 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["temperature"], r["alpha"]) for r in rows] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    table = capsys.readouterr().out
    assert "| T | alpha | val KD (T=1)" in table and table.count("\n| ") >= 5
    # The teacher data was generated once and shared by the four cells.
    assert len(list((tmp_path / "sweep" / "teacher_cache").iterdir())) == 1


def test_the_packaged_defaults_are_complete_and_the_checkouts_config_links_to_them():
    """`conch_dna/defaults/kd.toml` lists every setting at its default (it is the file users copy), and the
    checkout's `config/` files are links to the packaged ones, so the two cannot drift apart."""
    import tomllib
    from pathlib import Path

    from conch_dna.defaults import default_file
    from conch_dna.training.kd.config import KDConfig

    packaged = default_file("kd.toml")
    with open(packaged, "rb") as f:
        listed = tomllib.load(f)
    assert KDConfig.load(packaged) == KDConfig()
    text = packaged.read_text()
    unlisted = [name for name in KDConfig.model_fields if not re.search(rf"^(# )?{name} = ", text, re.M)
                and not isinstance(listed.get(name), dict)]
    assert not unlisted, unlisted  # a setting without a default (None) is listed commented out
    root = Path(__file__).resolve().parents[1]
    for name in ("kd.toml", "domains.toml"):
        link = root / "config" / name
        if link.exists():
            assert link.is_symlink() and link.resolve() == default_file(name).resolve(), name
