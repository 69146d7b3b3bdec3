"""The package as a user installs it: the README's install commands build the wheel and install it into a
fresh virtual environment (dependencies from the package index, no checkout on the path); then, from another
folder, the installed commands and the public API work, with the packaged domains and settings."""

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def install_commands() -> str:
    """The README's "Install" section's command block, as written."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Install", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    return block


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("builds the wheel from a checkout")
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONCH_", "PYTHON", "VIRTUAL_ENV"))}
    # A user's home: the venv (~/conch) and the prepared models (~/.cache/conch_dna) land in it; pip's cache is
    # the machine's, so the dependencies setup.sh already downloaded are not fetched again.
    pip_cache = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True).stdout.strip()
    env.update(HOME=str(home), PIP_CACHE_DIR=pip_cache or str(home / "pip-cache"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # python3 = the one running the tests
    dist = ROOT / "dist"
    for old in dist.glob("conch_dna-*.whl"):  # only what an earlier run of this test built
        old.unlink()
    run = subprocess.run(["bash", "-euc", install_commands()], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    venv = home / "conch"
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    env["VIRTUAL_ENV"] = str(venv)
    return venv, env, home


def run_installed(installed, *args, cwd, timeout=600):
    venv, env, _ = installed
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_installed_package_is_the_wheel_not_the_checkout(installed, tmp_path):
    out = run_installed(installed, "python", "-c", "import conch_dna, sys; print(conch_dna.__file__); print(sys.path)",
                        cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    location = out.stdout.splitlines()[0]
    assert str(installed[0]) in location and str(ROOT) not in out.stdout


def test_the_cli_answers_help_from_any_folder(installed, tmp_path):
    out = run_installed(installed, "conch-distill", "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "--temperature" in out.stdout and "default 2.0" in out.stdout
    out = run_installed(installed, "conch-cortex", "serve", "--help", cwd=tmp_path)
    assert out.returncode == 0 and "--registry" in out.stdout, out.stderr


def test_the_public_api_and_the_packaged_domains(installed, tmp_path):
    code = ("import conch_dna\n"
            "from conch_dna.training.kd import DOMAIN_PROMPTS, KDConfig, TrueKnowledgeDistiller, signals\n"
            "from conch_dna.cortex import Cortex, NeuronRegistry\n"
            "from conch_dna.ego import EGO\n"
            "from conch_dna.training.kd.domains import load_held_out\n"
            "print(sorted(DOMAIN_PROMPTS), len(load_held_out('thinking')), KDConfig().alpha)\n")
    out = run_installed(installed, "python", "-c", code, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("]")[0] == "['action', 'debug', 'memory', 'reflection', 'task', 'thinking'"
    assert " 0.7" in out.stdout


def test_the_installed_cli_distils_one_step_on_tiny_models(installed, tmp_path):
    build = ("import conch_dna\nfrom conch_dna.models.tiny import build_tiny_model\n"
             "t = build_tiny_model('teacher', num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, seed=0)\n"
             "build_tiny_model('student', num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1, seed=1, tokenizer_from=t)\n")
    assert run_installed(installed, "python", "-c", build, cwd=tmp_path).returncode == 0
    out = run_installed(installed, "conch-distill", "--domain", "thinking", "--teacher", "teacher", "--student", "student",
                        "--iters", "1", "--batch-size", "2", "--max-new-tokens", "8", "--max-seq-length", "256",
                        "--registry", "registry", "--log-json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["domain"] == "thinking" and result["registered_version"] == 1
    assert (tmp_path / "models" / "distilled_neurons" / "adapters_kd" / "thinking" / "adapters.safetensors").is_file()
    # and the installed server answers with the neuron it registered
    server = subprocess.Popen(["conch-cortex", "serve", "--registry", "registry", "--port", "0"], cwd=tmp_path,
                              env=installed[1], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = int(server.stdout.readline().rsplit(":", 1)[1].split("/")[0])
        body = json.dumps({"model": "thinking", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/v1/chat/completions", body=body)
        reply = json.loads(conn.getresponse().read())
        assert reply["system_fingerprint"] == "thinking-v1" and reply["usage"]["completion_tokens"] >= 1
    finally:
        server.terminate()
        server.wait(30)


def test_the_prepared_default_models_are_in_the_users_cache(installed, tmp_path):
    home = installed[2]
    prepared = home / ".cache" / "conch_dna"
    assert (prepared / "smollm2-135m-instruct" / "config.json").is_file()
    assert (prepared / "smollm2-135m-instruct-q4" / "config.json").is_file()
