"""The runtime loop across processes: one process serves CORTEX requests; another runs EGO, records
experience, self-distils and registers a new version; a third rolls back. The server picks up each change
from the next request on, never fails, never serves a half-registered version, and never restarts."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conch_dna.cortex import NeuronRegistry
from conch_dna.ego.experience import held_out
from tests.conftest import PROMPTS

SERVER = """
import json, sys, time
from pathlib import Path
import conch_dna
from conch_dna.cortex import Cortex, NeuronRegistry
registry, student, log, stop = sys.argv[1:5]
cortex = Cortex(NeuronRegistry(registry, base_model=student), student)
with open(log, "a") as out:
    while not Path(stop).exists():
        t = time.time_ns()
        answer = cortex.generate("thinking", "what next?", max_tokens=4)
        out.write(json.dumps({"start_ns": t, "version": answer.version}) + "\\n")
        out.flush()
"""

EGO_PROCESS = """
import json, sys
import conch_dna
from conch_dna.cortex import NeuronRegistry
from conch_dna.ego.experience import held_out
from conch_dna.ego import EGO
from conch_dna.training.kd import KDConfig
teacher, student, registry, work, prompts = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
cfg = KDConfig(iters=4, batch_size=2, val_interval=4, checkpoint_interval=4, output_dir=work + "/out", max_seq_length=64,
               learning_rate=2e-2, student_model_id=student, eval_max_new_tokens=0,
               generation={"max_new_tokens": 10, "batch_size": 4})
ego = EGO(teacher, registry=NeuronRegistry(registry, base_model=student), config=cfg, experience=work + "/exp.db")
for p in prompts:
    ego.chat(p, max_tokens=10, domain="thinking")
handle = ego.self_distill("thinking", prompts=[])  # the experience alone
assert handle.wait(300), "timed out"
print(json.dumps({"status": handle.status, "version": getattr(handle.version, "version", None),
                  "answered": handle.result.generation.get("answered") if handle.result else None, "error": str(handle.error)}))
"""

ROLLBACK = """
import sys
from conch_dna.cortex import NeuronRegistry
from conch_dna.ego.experience import held_out
print(NeuronRegistry(sys.argv[1]).rollback("thinking").version)
"""


def served(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(x) for x in log.read_text().splitlines() if x.endswith("}")]


def wait_for_requests_after(log: Path, t_ns: int, n: int = 3, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        after = [r for r in served(log) if r["start_ns"] > t_ns]
        if len(after) >= n:
            return after
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} requests served after the change")


def test_cortex_in_another_process_picks_up_register_and_rollback(tiny_pair, tmp_path):
    from conch_dna.training.kd import KDConfig, TrueKnowledgeDistiller

    teacher, student = tiny_pair
    reg_dir = tmp_path / "registry"
    cfg = KDConfig(iters=2, batch_size=2, val_interval=2, checkpoint_interval=2, output_dir=str(tmp_path / "v1"),
                   max_seq_length=64, student_model_id=str(student), teacher_model_id=str(teacher), eval_max_new_tokens=0,
                   generation={"max_new_tokens": 8, "batch_size": 4})
    r = TrueKnowledgeDistiller(config=cfg).distill_domain("thinking", PROMPTS[:4])
    assert NeuronRegistry(reg_dir, base_model=student).register("thinking", r.adapter_path).version == 1

    log, stop = tmp_path / "served.jsonl", tmp_path / "stop"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(reg_dir), str(student), str(log), str(stop)],
                              stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for_requests_after(log, 0)  # serving v1
        ego = subprocess.run([sys.executable, "-c", EGO_PROCESS, str(teacher), str(student), str(reg_dir), str(tmp_path),
                              json.dumps(PROMPTS)], capture_output=True, text=True, timeout=300, env=env)
        assert ego.returncode == 0, ego.stderr[-3000:]
        outcome = json.loads(ego.stdout.strip().splitlines()[-1])
        assert outcome["status"] == "succeeded" and outcome["version"] == 2, outcome
        # EGO's stored answers of the training split, none regenerated
        assert outcome["answered"] == sum(not held_out(p, 0.2) for p in PROMPTS)
        # The change is visible once the process that made it has returned (the manifest's mtime is that of the
        # write, a little before the rename that publishes it).
        registered_ns = time.time_ns()
        assert all(r["version"] == 2 for r in wait_for_requests_after(log, registered_ns))

        back = subprocess.run([sys.executable, "-c", ROLLBACK, str(reg_dir)], capture_output=True, text=True, env=env)
        assert back.returncode == 0 and back.stdout.strip() == "1", back.stderr
        rolled_ns = time.time_ns()
        assert all(r["version"] == 1 for r in wait_for_requests_after(log, rolled_ns))
    finally:
        stop.touch()
        err = server.communicate(timeout=60)[1]
    assert server.returncode == 0, err[-3000:]  # the server never failed a request
    versions = [r["version"] for r in served(log)]
    # v1, then v2 from the request after the registration on, then v1 again after the rollback: no other order.
    changes = [v for i, v in enumerate(versions) if i == 0 or v != versions[i - 1]]
    assert changes == [1, 2, 1], changes


BATCHED_SERVER = """
import json, sys, threading, time
from pathlib import Path
import conch_dna
from conch_dna.cortex import Cortex, NeuronRegistry
registry, log, stop = sys.argv[1:4]
cortex = Cortex(NeuronRegistry(registry))
lock = threading.Lock()
def client(i):
    with open(log, "a") as out:
        while not Path(stop).exists():
            t = time.time_ns()
            answer = cortex.stream("thinking", "question %d" % (i % 2), max_tokens=24)
            text = answer.text()
            with lock:
                out.write(json.dumps({"start_ns": t, "end_ns": time.time_ns(), "version": answer.version, "q": i % 2,
                                      "text": text, "finish": answer.finish_reason}) + "\\n")
                out.flush()
threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
for t in threads: t.start()
for t in threads: t.join()
"""

PROMOTE = """
import sys
from conch_dna.cortex import NeuronRegistry
print(NeuronRegistry(sys.argv[1]).promote("thinking", int(sys.argv[2])).version)
"""


def test_batched_requests_keep_their_version_while_another_process_promotes_and_rolls_back(tiny_pair, tmp_path):
    """Six concurrent clients share one batch in a server process while other processes promote and roll back:
    every answer is exactly its version's answer (no token from the other), requests that start after a
    change get the new version, and none fails."""
    from tests.conftest import random_adapter
    from tests.test_cortex_batching import alone

    _, student = tiny_pair
    reg_dir = tmp_path / "registry"
    registry = NeuronRegistry(reg_dir, base_model=student)
    registry.register("thinking", random_adapter(student, tmp_path / "a1", seed=1))
    registry.register("thinking", random_adapter(student, tmp_path / "a2", seed=2, rank=8), activate=False)
    expected = {}
    for version in (1, 2):
        registry.promote("thinking", version)
        expected.update({(version, q): alone(student, registry, "thinking", f"question {q}", 24) for q in (0, 1)})
    registry.promote("thinking", 1)
    assert expected[1, 0] != expected[2, 0]

    log, stop = tmp_path / "served.jsonl", tmp_path / "stop"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    server = subprocess.Popen([sys.executable, "-c", BATCHED_SERVER, str(reg_dir), str(log), str(stop)],
                              stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for_requests_after(log, 0, n=6)
        straddling = []
        for version, script in ((2, PROMOTE), (1, ROLLBACK)):
            changed = subprocess.run([sys.executable, "-c", script, str(reg_dir), "2"], capture_output=True, text=True, env=env)
            assert changed.returncode == 0 and changed.stdout.strip() == str(version), changed.stderr
            changed_ns = time.time_ns()
            assert all(r["version"] == version for r in wait_for_requests_after(log, changed_ns, n=6))
            straddling += [r for r in served(log) if r["start_ns"] < changed_ns < r["end_ns"]]
    finally:
        stop.touch()
        err = server.communicate(timeout=60)[1]
    assert server.returncode == 0, err[-3000:]  # no request failed
    rows = served(log)
    assert straddling and all(r["finish"] in ("length", "stop") for r in rows)
    for r in rows:  # in flight across a change or not, each answer is all its own version's
        assert r["text"] == expected[r["version"], r["q"]], r
