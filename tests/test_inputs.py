"""Input that never ends is refused: prompt, settings and domains files must be regular files of bounded size,
and a model's chat template must do bounded work, each checked before any model works."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conch_dna.models.templates import ChatTemplateError, check_chat_template, folder_chat_templates
from tests.conftest import cli_config

BOMBS = [
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{{ messages|tojson }}{% for m in messages %}{% for c in m.content %}{% for d in m.content %}.{% endfor %}"
    "{% endfor %}{% endfor %}",
    "{{ 'x' * 10**10 }}",
    "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
]


@pytest.mark.parametrize("template", BOMBS)
def test_a_template_that_does_unbounded_work_is_refused_quickly(template):
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateError, match="unbounded work"):
        check_chat_template(template, "bomb")
    assert time.perf_counter() - t0 < 30


def test_real_templates_pass(tiny_pair, default_pair):
    for folder in (*tiny_pair, *default_pair):
        for template in folder_chat_templates(folder):
            check_chat_template(template, str(folder))


def cli(args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "conch_dna.training.kd", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=120)


def test_a_model_whose_template_never_ends_is_refused_before_any_work(tiny_pair, tmp_path):
    teacher, student = tiny_pair
    bad = tmp_path / "bad_teacher"
    shutil.copytree(teacher, bad)
    cfg = json.loads((bad / "tokenizer_config.json").read_text())
    cfg["chat_template"] = BOMBS[0]
    (bad / "tokenizer_config.json").write_text(json.dumps(cfg))
    run = cli(["--domain", "thinking", "--teacher", str(bad), "--student", str(student), "--output", str(tmp_path / "out"),
               "--no-register"], cwd=tmp_path)
    assert run.returncode == 2 and "unbounded work" in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_inputs_that_never_end_are_refused_not_waited_on(tiny_pair, tmp_path):
    teacher, student = tiny_pair
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "kd.toml").write_text(cli_config(batch_size=2, iters=1, gen_batch=4))
    base = ["--domain", "thinking", "--teacher", str(teacher), "--student", str(student), "--no-register",
            "--output", str(tmp_path / "out")]
    cases = [
        (["--prompts", str(fifo), "--config", str(tmp_path / "kd.toml")], {}, "not a regular file"),
        (["--prompts", "/dev/zero", "--config", str(tmp_path / "kd.toml")], {}, "not a regular file"),
        (["--config", str(fifo)], {}, "not a regular file"),
        ([], {"CONCH_KD_CONFIG_FILE": str(fifo)}, "not a regular file"),
        (["--config", str(tmp_path / "kd.toml")], {"CONCH_KD_DOMAINS_FILE": str(fifo)}, "not a regular file"),
    ]
    for args, env, message in cases:
        run = cli([*base, *args], tmp_path, env)
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, (args, env, run.stderr[-1500:])
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:
        f.truncate(65 << 20)  # sparse: 65 MB of nothing
    run = cli([*base, "--prompts", str(huge), "--config", str(tmp_path / "kd.toml")], tmp_path)
    assert run.returncode == 2 and "more than the 64 MB allowed" in run.stderr, run.stderr[-1500:]
    assert not (tmp_path / "out").exists()
