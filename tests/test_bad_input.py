"""Bad input exits 2 with a message that says what was wrong, before anything is written (issue 19)."""

import subprocess
import sys

import pytest

from conch_dna.cortex import NeuronRegistry
from conch_dna.training.kd.data import DataError, check_name, load_prompts


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
