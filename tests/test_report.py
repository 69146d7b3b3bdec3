"""One reporting path: metrics.jsonl, the signals and the log lines carry the same figures under
the same names, step by step, on one process and (only rank 0 reporting) on two; the progress bar draws
from the signals and prints log lines above itself."""

import io
import json
import random
import re
import subprocess
import sys

import pytest
from structlog.testing import capture_logs

from conch_dna.training.kd import TrueKnowledgeDistiller, signals
from tests.conftest import PROMPTS, cli_config

STEP_FIELDS = ["step", "iters", "loss", "kd", "ce", "lr", "grad_norm", "tokens_per_second", "peak_memory_gb", "tokens"]


def agree(rows: list[dict], sent: list[dict], logged: list[dict], iters: int) -> None:
    """The three channels say the same thing about every step (logs round floats to 5 decimals)."""
    train = [r for r in rows if r["type"] == "train"]
    assert [r["step"] for r in train] == [s["step"] for s in sent] == [g["step"] for g in logged] == list(range(1, iters + 1))
    for row, kw, line in zip(train, sent, logged):
        assert set(STEP_FIELDS) <= set(kw) and set(STEP_FIELDS) <= set(row)
        for name in STEP_FIELDS:
            assert row[name] == kw[name], name  # the same value under the same name
            assert line[name] == pytest.approx(kw[name], abs=1e-5), name
    vals = [r for r in rows if r["type"] == "val"]
    assert [v["step"] for v in vals] == [0, 4, iters]


def test_metrics_signals_and_log_agree_step_by_step(tiny_pair, kd_config):
    cfg = kd_config(iters=8, val_interval=4)
    d = TrueKnowledgeDistiller(str(tiny_pair[0]), str(tiny_pair[1]), cfg)
    sent, validations = [], []
    with signals.step_completed.connected_to(lambda s, **kw: sent.append(kw), sender=d), \
            signals.validation_completed.connected_to(lambda s, **kw: validations.append(kw), sender=d), \
            capture_logs() as logs:
        d.distill_domain("task", PROMPTS)
    rows = [json.loads(x) for x in (cfg.output_dir / "task" / "metrics.jsonl").read_text().splitlines()]
    agree(rows, sent, [e for e in logs if e["event"] == "step"], cfg.iters)
    for row, kw in zip([r for r in rows if r["type"] == "val"], validations):
        assert {k: v for k, v in row.items() if k != "type"} == {k: v for k, v in kw.items() if k not in ("domain", "run_id")}


DRIVER = """
import json, sys
from conch_dna.training.kd import cli, distributed, signals
sent = []
signals.step_completed.connect(lambda sender, **kw: sent.append(kw), weak=False)
rc = cli.main(sys.argv[2:])
open(f"{sys.argv[1]}/signals_{distributed.rank()}.json", "w").write(json.dumps(sent))
sys.exit(rc)
"""


def test_two_processes_report_once_and_agree(tiny_pair, tmp_path):
    from tests.test_distributed import LAUNCH

    teacher, student = tiny_pair
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    (tmp_path / "kd.toml").write_text(cli_config(batch_size=4, iters=8, gen_batch=8))
    port = random.randint(20000, 40000)
    run = subprocess.run([sys.executable, "-c", LAUNCH, "--backend", "ring", "-n", "2", "--starting-port", str(port), "--",
                          sys.executable, "-c", DRIVER, str(tmp_path), "--domain", "thinking", "--prompts", str(tmp_path / "p.txt"),
                          "--teacher", str(teacher), "--student", str(student), "--output", str(tmp_path / "out"),
                          "--config", str(tmp_path / "kd.toml"), "--no-register", "--log-json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-2000:])
    rows = [json.loads(x) for x in (tmp_path / "out/thinking/metrics.jsonl").read_text().splitlines()]
    logged = [json.loads(x) for x in (run.stdout + run.stderr).splitlines() if x.startswith("{") and '"event": "step"' in x]
    sent0 = json.loads((tmp_path / "signals_0.json").read_text())
    assert json.loads((tmp_path / "signals_1.json").read_text()) == []  # rank 1 reports nothing
    agree(rows, sent0, logged, 8)


def test_progress_bar_draws_from_the_signals_and_prints_logs_above_it(tiny_pair, kd_config, monkeypatch):
    """On a (forced) terminal the bar shows the teacher's answers, the training steps and the judging;
    a log line written to stderr while it is live comes out whole, on a line of its own."""
    from rich.console import Console

    from conch_dna.log_setup import configure_logging
    from conch_dna.progress import ProgressBar

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=2000, color_system=None)  # no wrapping
    configure_logging(json_lines=True)
    cfg = kd_config(iters=4)
    with ProgressBar(console) as bar:
        assert bar.enabled
        TrueKnowledgeDistiller(str(tiny_pair[0]), str(tiny_pair[1]), cfg).distill_domain("task", PROMPTS)
    text = screen.getvalue()
    for label in ("teacher answers task", "training task", "judging held-out task", "4/4", "tok/s", "agreement"):
        assert label in text, label
    # What a terminal shows: rich erases its bar (cursor-up, erase-line codes), prints the log line, redraws.
    lines = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", ln) for ln in text.replace("\r", "\n").splitlines()]
    logged = [ln for ln in lines if '"event": "domain completed"' in ln]
    assert logged and all(ln.startswith("{") and ln.endswith("}") and "━" not in ln for ln in logged)
    assert not any(sig.receivers for sig in (signals.step_completed, signals.teacher_progress))  # disconnected


def test_no_bar_when_stderr_is_not_a_terminal():
    from rich.console import Console

    from conch_dna.progress import ProgressBar

    with ProgressBar(Console(file=io.StringIO(), force_terminal=False)) as bar:
        assert not bar.enabled and not signals.step_completed.receivers
