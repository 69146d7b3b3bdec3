"""Bad input exits 2 with a message that says what was wrong, before anything is written."""

import subprocess
import sys

import pytest

from conch_dna.cortex import NeuronRegistry
from conch_dna.neuron import DataError, check_name
from conch_dna.training.kd.domains import load_prompts


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "scripts/distill_neurons.py", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("name", ["../escaped", "a/b", ".hidden", "", "x" * 65, "a..b"])
def test_bad_names_are_refused_in_one_place(name, tmp_path):
    with pytest.raises(DataError, match="invalid domain name"):
        check_name(name)
    with pytest.raises(DataError, match="invalid neuron name"):
        NeuronRegistry(tmp_path / "reg").register(name, tmp_path)
    assert check_name("thinking-v2.1") == "thinking-v2.1"


def test_cli_path_traversal_writes_nothing(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\n")
    out = tmp_path / "out"
    r = cli("--domain", "../escaped", "--prompts", str(prompts), "--output", str(out))
    assert r.returncode == 2 and "invalid domain name '../escaped'" in r.stderr
    assert not out.exists() and not (tmp_path / "escaped").exists()


def test_cli_all_with_prompts_is_refused(tmp_path):
    r = cli("--all", "--prompts", str(tmp_path / "p.txt"))
    assert r.returncode == 2 and "--prompts applies to one --domain" in r.stderr


def test_cli_prompts_folder_is_refused(tmp_path):
    r = cli("--domain", "x", "--prompts", str(tmp_path))
    assert r.returncode == 2 and "is a folder" in r.stderr and "Traceback" not in r.stderr


def test_plain_prompts_starting_with_a_quote(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text('"Quoted" words open this prompt\nsecond prompt\n')
    assert load_prompts(f) == ['"Quoted" words open this prompt', "second prompt"]
    j = tmp_path / "p2.txt"
    j.write_text('{"prompt": "a"}\n"b"\n')  # every line JSON: JSONL whatever the suffix
    assert load_prompts(j) == ["a", "b"]
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: not valid JSON.*rename it .txt"):
        load_prompts(bad)


@pytest.mark.parametrize("flags, message", [
    (["--iters", "9223372036854775808"], "iters = 9223372036854775808: Input should be less than or equal to 1000000000"),
    (["--memory-limit-gb", "inf"], "memory_limit_gb = inf"),
])
def test_out_of_range_numbers_exit_2(flags, message, tmp_path):
    r = cli("--domain", "thinking", "--output", str(tmp_path / "out"), *flags)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_non_utf8_config_exits_2(tmp_path):
    f = tmp_path / "kd.toml"
    f.write_bytes(b"iters = 3\n# \xff\xfe\n")
    r = cli("--domain", "thinking", "--config", str(f))
    assert r.returncode == 2 and "is not UTF-8 text" in r.stderr and "Traceback" not in r.stderr


def test_list_with_an_active_version_that_does_not_exist(tmp_path):
    reg = tmp_path / "reg"
    reg.mkdir()
    (reg / "registry.json").write_text('{"format": 1, "neurons": {"thinking": {"versions": [], "active": 3, "history": [3]}}}')
    r = cli("--list", "--registry", str(reg))
    assert r.returncode == 2 and "names version(s) [3] as active" in r.stderr and "Traceback" not in r.stderr


def test_resume_errors_exit_2_and_keep_the_adapter(tiny_pair, tmp_path):
    from tests.conftest import PROMPTS, cli_config

    teacher, student = tiny_pair
    cfg = tmp_path / "kd.toml"
    cfg.write_text(cli_config(batch_size=2, iters=2, gen_batch=4))
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[:4]))
    base = ["--domain", "thinking", "--prompts", str(prompts), "--teacher", str(teacher), "--student", str(student),
            "--config", str(cfg), "--output", str(tmp_path / "out"), "--no-register"]
    assert cli(*base).returncode == 0
    adapter = tmp_path / "out" / "thinking" / "adapters.safetensors"
    good = adapter.read_bytes()
    r = cli(*base, "--resume", "--iters", "1")
    assert r.returncode == 2 and "past iters=1" in r.stderr and "Traceback" not in r.stderr
    ckpt = sorted((tmp_path / "out" / "thinking").glob("checkpoint_*"))[-1]
    opt = ckpt / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:100])  # truncated
    r = cli(*base, "--resume", "--iters", "4")
    assert r.returncode == 2 and "is unreadable" in r.stderr and "Traceback" not in r.stderr
    assert adapter.read_bytes() == good  # the finished adapter was never replaced


def test_registry_crash_leftovers_are_removed_on_the_next_register(tiny_pair, tmp_path):
    from conch_dna.training.kd import KDConfig, TrueKnowledgeDistiller
    from tests.conftest import PROMPTS

    cfg = KDConfig(iters=2, batch_size=2, val_interval=2, checkpoint_interval=2, max_seq_length=64,
                   output_dir=str(tmp_path / "out"), generation={"max_new_tokens": 8}, eval_max_new_tokens=0)
    r = TrueKnowledgeDistiller(str(tiny_pair[0]), str(tiny_pair[1]), cfg).distill_domain("thinking", PROMPTS[:4])
    leftover = tmp_path / "reg" / "thinking" / ".v0001.tmp-dead"
    leftover.mkdir(parents=True)
    (leftover / "adapters.safetensors").write_bytes(b"x" * 1000)
    v = NeuronRegistry(tmp_path / "reg", base_model=str(tiny_pair[1])).register("thinking", r.adapter_path)
    assert v.version == 1 and not leftover.exists()


def test_a_student_without_tokenizer_files_is_refused_before_any_work(tiny_pair, tmp_path):
    import shutil

    teacher, student = tiny_pair
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copyfile(student / f, bare / f)
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\nthree\n")
    out = tmp_path / "out"
    r = cli("--domain", "thinking", "--prompts", str(prompts), "--teacher", str(teacher), "--student", str(bare),
            "--output", str(out), "--registry", str(tmp_path / "reg"))
    assert r.returncode == 2 and "missing tokenizer.json or tokenizer.model" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (out / "teacher_cache").exists() and not (tmp_path / "reg").exists()


def _tiny_cli_run(tiny_pair, tmp_path, iters=2):
    from tests.conftest import PROMPTS, cli_config

    teacher, student = tiny_pair
    cfg = tmp_path / "kd.toml"
    cfg.write_text(cli_config(batch_size=2, iters=iters, gen_batch=4))
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[:4]))
    return ["--domain", "thinking", "--prompts", str(prompts), "--teacher", str(teacher), "--student", str(student),
            "--config", str(cfg), "--output", str(tmp_path / "out")]


def test_resume_with_another_lora_rank_is_refused_and_keeps_the_adapter(tiny_pair, tmp_path):
    """`--resume --lora-rank 8` on a rank-16 run lists what differs, exits 2 before the
    teacher works, and never replaces the finished adapter."""
    base = [*_tiny_cli_run(tiny_pair, tmp_path), "--no-register"]
    assert cli(*base, "--lora-rank", "16").returncode == 0
    adapter = tmp_path / "out" / "thinking" / "adapters.safetensors"
    good = adapter.read_bytes()
    r = cli(*base, "--resume", "--lora-rank", "8", "--iters", "4")
    assert r.returncode == 2 and "holds another adapter than this run trains" in r.stderr, r.stderr
    assert "'rank': 16" in r.stderr and "'rank': 8" in r.stderr and "Traceback" not in r.stderr
    assert adapter.read_bytes() == good
    assert cli(*base, "--resume", "--lora-rank", "16", "--iters", "3").returncode == 0  # the same settings resume


def test_resume_that_would_mix_two_runs_is_refused_listing_the_differences(tiny_pair, tmp_path):
    """A checkpoint records what it was trained on (settings, the teacher's weights, domain, data): a resume
    with another temperature, alpha, divergence, prompt set or teacher is refused before the teacher works,
    naming each difference; the same run resumes, with more steps."""
    from conch_dna.models.tiny import build_tiny_model
    from tests.conftest import PROMPTS

    base = [*_tiny_cli_run(tiny_pair, tmp_path), "--no-register"]
    assert cli(*base).returncode == 0
    adapter = tmp_path / "out" / "thinking" / "adapters.safetensors"
    good = adapter.read_bytes()
    r = cli(*base, "--resume", "--iters", "4", "--temperature", "3", "--alpha", "0.5", "--divergence", "jsd")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    for difference in ("temperature: checkpoint 2.0, this run 3.0", "alpha: checkpoint 0.7, this run 0.5",
                       "divergence: checkpoint 'forward_kl', this run 'jsd'"):
        assert difference in r.stderr, r.stderr
    other_prompts = tmp_path / "other.txt"
    other_prompts.write_text("\n".join(PROMPTS[4:]))
    r = cli(*[a if a != str(tmp_path / "p.txt") else str(other_prompts) for a in base], "--resume", "--iters", "4")
    assert r.returncode == 2 and "data: checkpoint" in r.stderr, r.stderr
    other_teacher = build_tiny_model(tmp_path / "teacher2", num_layers=4, hidden_size=64, seed=7, tokenizer_from=tiny_pair[0])
    r = cli(*[a if a != str(tiny_pair[0]) else str(other_teacher) for a in base], "--resume", "--iters", "4")
    assert r.returncode == 2 and "teacher_weights: checkpoint" in r.stderr, r.stderr
    assert adapter.read_bytes() == good
    assert cli(*base, "--resume", "--iters", "3").returncode == 0


def test_a_checkpoint_of_other_shapes_is_refused_when_loaded(tiny_pair, kd_config):
    """The arrays are compared too (a checkpoint whose config was edited, or another model's): names and
    shapes, listed; nothing is loaded."""
    import json

    from conch_dna.training.kd import TrueKnowledgeDistiller
    from conch_dna.training.kd.checkpoints import CheckpointError
    from tests.conftest import PROMPTS

    cfg = kd_config(iters=2, checkpoint_interval=2)
    TrueKnowledgeDistiller(str(tiny_pair[0]), str(tiny_pair[1]), cfg).distill_domain("task", PROMPTS)
    ckpt = cfg.output_dir / "task" / "checkpoint_000002"
    other = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"rank": 4}), "iters": 4})
    saved = json.loads((ckpt / "adapter_config.json").read_text())
    saved["lora_parameters"]["rank"] = 4  # the config says rank 4, the arrays are rank 16
    (ckpt / "adapter_config.json").write_text(json.dumps(saved))
    state = json.loads((ckpt / "state.json").read_text())
    state["sha256"].pop("adapter_config.json")
    (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"arrays of other shapes \(e.g. .*lora_a: checkpoint \(\d+, \d+\), this run \(\d+, 4\)"):
        TrueKnowledgeDistiller(str(tiny_pair[0]), str(tiny_pair[1]), other).distill_domain("task", PROMPTS, resume=True)


@pytest.mark.parametrize("make", ["file", "corrupt"])
def test_a_bad_registry_is_refused_before_the_teacher_works(tiny_pair, tmp_path, make):
    """A --registry that is a file, or a corrupt manifest, exits 2 before any teacher answer."""
    reg = tmp_path / "reg"
    if make == "file":
        reg.write_text("not a folder")
    else:
        reg.mkdir()
        (reg / "registry.json").write_text("{ not json")
    r = cli(*_tiny_cli_run(tiny_pair, tmp_path), "--registry", str(reg))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert ("registry folder" in r.stderr) if make == "file" else ("is corrupt" in r.stderr)
    assert not (tmp_path / "out" / "teacher_cache").exists()


def test_max_seq_length_beyond_the_context_is_refused(tiny_pair, tmp_path):
    r = cli(*_tiny_cli_run(tiny_pair, tmp_path), "--max-seq-length", "4096", "--no-register")
    assert r.returncode == 2 and "longer than the student's context (2048 tokens" in r.stderr, r.stderr
    assert not (tmp_path / "out" / "teacher_cache").exists()


def test_a_prompt_longer_than_max_seq_length_is_refused_before_generation(tiny_pair, tmp_path):
    args = _tiny_cli_run(tiny_pair, tmp_path)
    (tmp_path / "p.txt").write_text("short prompt\n" + "word " * 400 + "\n")
    r = cli(*args, "--no-register")
    assert r.returncode == 2 and "does not fit max_seq_length=64" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out" / "teacher_cache").exists()
