"""The repository describes the software as it is: the reference matches the code, the README stays short and
its commands are the ones CI runs, and no tracked file speaks of how the software was made."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Development history: numbered sessions, sprints or issues, counted rounds of work, dated file names.
HISTORY = re.compile(
    r"\b(?:sess" r"ions?|sprints?|iss" r"ues?|tick" r"ets?)[ _-]?#?\d+"
    r"|\bround[ _-](?:one|two|three|four|five|six|\d+)\b"
    r"|\b(?:work|dev" r"elopment) periods?\b", re.I)
DATED_NAME = re.compile(r"(^|/)20\d\d-\d\d-\d\d")


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.decode().split("\0") if p]


def write_reference():
    spec = importlib.util.spec_from_file_location("write_reference", ROOT / "scripts" / "write_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_tracked_file_speaks_of_the_development_history():
    found = []
    for path in tracked_files():
        rel = path.relative_to(ROOT).as_posix()
        if DATED_NAME.search(rel) or HISTORY.search(rel):
            found.append(f"{rel}: its name")
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:  # binary
            continue
        for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if m := HISTORY.search(line):
                found.append(f"{rel}:{n}: {m.group(0)!r}")
    assert not found, "development history in the tree:\n" + "\n".join(found[:40])


def test_the_history_check_catches_what_it_should():
    for text in ["as measured in sess" "ion 12", "see iss" "ue #22", "Against loops, ro" "und three", "work " "period 4"]:
        assert HISTORY.search(text), text
    for text in ["the session's figures", "issues a request", "rounded to three", "20 steps"]:
        assert not HISTORY.search(text), text


def test_the_reference_lists_every_flag_field_and_signal_keyword():
    """The generated tables equal what the code says now, and they name every flag, field and keyword."""
    module = write_reference()
    text = (ROOT / "docs" / "reference.md").read_text()
    assert module.render(text) == text, "docs/reference.md is out of date: run python3 scripts/write_reference.py"
    from conch_dna.training.kd import signals
    from conch_dna.training.kd.cli import build_parser
    from conch_dna.training.kd.config import config_fields

    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert f"`{flag}" in text or f", {flag}" in text, flag
    for name in config_fields():
        assert f"| `{name}` |" in text, name
    for sig in signals.ALL_SIGNALS:
        for kw in module.documented_kwargs(sig):
            assert f"`{kw}`" in text, (sig.name, kw)


def test_signal_payloads_are_the_documented_keywords(tiny_pair, kd_config):
    """What a run sends is what the signals' docs (and so the reference) list, keyword for keyword."""
    from conch_dna.training.kd import TrueKnowledgeDistiller, signals
    from tests.conftest import PROMPTS
    from tests.test_signals import record_all

    module = write_reference()
    teacher, student = tiny_pair
    d = TrueKnowledgeDistiller(str(teacher), str(student), kd_config(iters=2, val_interval=1, checkpoint_interval=1))
    stack, events = record_all()
    with stack:
        d.distill_domain("thinking", PROMPTS)
    by_name = {sig.name: sig for sig in signals.ALL_SIGNALS}
    sent = {}
    for name, _, kw in events:
        sent.setdefault(name, set()).update(kw)
    assert len(sent) >= 7
    for name, keys in sent.items():
        assert keys == set(module.documented_kwargs(by_name[name])), name


def test_the_readme_is_short_and_opens_with_the_two_commands_ci_runs():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150
    commands = [line for line in lines[:12] if line.startswith("bash scripts/setup.sh && ")]
    assert len(commands) == 2, commands
    assert "scripts/distill_neurons.py --domain" in commands[0]
    assert commands[1] in (ROOT / ".ci" / "run").read_text(), "CI runs the README's test command, verbatim"


def test_every_script_and_benchmark_answers_help():
    import sys

    scripts = sorted((ROOT / "scripts").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    assert len(scripts) >= 14
    for script in scripts:
        run = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd="/", timeout=120)
        assert run.returncode == 0 and len(run.stdout) > 80, (script.name, run.stderr[-500:])


def test_every_docs_path_the_tree_mentions_exists():
    """A moved or removed page leaves no dangling pointer in code, tests, scripts or docs."""
    missing = []
    for path in tracked_files():
        if path.is_symlink() or not path.is_file() or b"\0" in path.read_bytes() or "/runs/" in path.as_posix():
            continue
        text = path.read_text(errors="replace")
        names = re.findall(r"\bdocs/[\w./-]*\w", text)
        if path.parent.name == "docs":  # relative links between pages
            names += ["docs/" + m for m in re.findall(r"\]\((?!https?:)([\w./-]+)\)", text)]
            names += ["docs/" + m for m in re.findall(r"`(runs/[\w.{},-]+)`", text) if "*" not in m and "{" not in m]
        for name in names:
            target = ROOT / name.removeprefix("docs/../")
            if not target.exists() and not list(ROOT.glob(name.rstrip(".") + "*")):
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, missing


def test_the_readmes_python_runs_as_written(tiny_pair, tmp_path):
    """The README's Python blocks, run as they are on the tiny models (fewer steps, shorter answers, the
    quality gate off: random tiny models loop as much as their teacher)."""
    teacher, student = tiny_pair
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 2
    small = ('KDConfig(batch_size=2, max_seq_length=128, val_interval=1, eval_max_new_tokens=8, '
             'generation={"max_new_tokens": 8, "batch_size": 8}, ')
    for n, block in enumerate(blocks):
        code = (block.replace('"default-teacher"', repr(str(teacher))).replace('"default-student"', repr(str(student)))
                .replace("quality_gate=True", "quality_gate=False").replace("KDConfig(", small))
        code = re.sub(r"iters=\d+", "iters=2", code)
        script = tmp_path / f"readme_{n}.py"
        script.write_text(code)
        run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, (n, run.stderr[-3000:])
