"""EGO's experience store: concurrent writers, crash safety, refusals, the fixed held-out split,
and a neuron distilled from experience that beats the untrained student on the held-out experience."""

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from conch_dna.ego import EGO, ExperienceStore, ExperienceStoreError
from conch_dna.ego.experience import held_out, training_data
from conch_dna.training.kd import KDConfig


def test_record_split_dedup_tag_and_retention(tmp_path):
    store = ExperienceStore(tmp_path / "x.db", retention=50)
    for i in range(60):
        store.record("task", f"prompt {i % 40}", f"answer {i}", model="m", answer_ids=[i, 2])
    assert store.count("task") == 50  # retention: the oldest 10 dropped
    train, held = store.split("task")
    prompts = [e.prompt for e in train + held]
    assert len(prompts) == len(set(prompts)) == 40  # deduplicated: the newest answer of each prompt
    assert {e.answer for e in train + held if e.prompt == "prompt 5"} == {"answer 45"}
    assert all(held_out(e.prompt, 0.2) for e in held) and not any(held_out(e.prompt, 0.2) for e in train)
    # The split is a function of the prompt alone: more experience never moves a prompt between splits.
    for i in range(40, 80):
        store.record("task", f"prompt {i}", "later", model="m")
    train2, held2 = store.split("task")
    was_held, is_held = {e.prompt for e in held}, {e.prompt for e in held2}
    both = {e.prompt for e in train + held} & {e.prompt for e in train2 + held2}
    assert both and all((p in was_held) == (p in is_held) for p in both)
    untagged = store.record(None, "what is this?", "no idea", model="m")
    assert store.tag([untagged], "memory") == 1 and [e.prompt for e in store.records("memory")] == ["what is this?"]
    assert store.domains() == ["memory", "task"]
    data = training_data(store, "task", fingerprint="m")
    assert all(ids for _, ids in data["answered"]) and len(data["held_out"]) <= 10
    with pytest.raises(ValueError, match="retention"):
        ExperienceStore(tmp_path / "y.db", retention=0)


WRITER = """
import sys
from conch_dna.ego import ExperienceStore
store = ExperienceStore(sys.argv[1])
for i in range(int(sys.argv[2])):
    rid = store.record("task", f"process prompt {i}", "a" * 200, model="m", answer_ids=list(range(50)))
    print(rid, flush=True)  # after the commit: this record is durable
"""


def test_threads_and_a_second_process_write_at_once(tmp_path):
    db = tmp_path / "x.db"
    store = ExperienceStore(db)
    other = subprocess.Popen([sys.executable, "-c", WRITER, str(db), "150"], stdout=subprocess.PIPE, text=True)

    def write(t):
        for i in range(50):
            store.record("task", f"thread {t} prompt {i}", "answer", model="m")

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert other.wait(60) == 0
    records = store.records("task")
    assert len(records) == 350 and len({e.id for e in records}) == 350
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_kill_9_while_writing_loses_at_most_the_record_in_flight(tmp_path):
    db = tmp_path / "x.db"
    ExperienceStore(db)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db), "1000000"], stdout=subprocess.PIPE, text=True)
    committed = []
    deadline = time.monotonic() + 60
    while len(committed) < 300 and time.monotonic() < deadline:
        committed.append(int(writer.stdout.readline()))
    writer.send_signal(signal.SIGKILL)
    rest = writer.communicate()[0].split()
    committed += [int(x) for x in rest]
    store = ExperienceStore(db)
    ids = {e.id for e in store.records("task")}
    assert set(committed) <= ids and len(ids) <= len(committed) + 1  # every acknowledged record, at most one more
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store.record("task", "after the crash", "fine", model="m")  # and it keeps working


def test_corrupt_foreign_and_newer_databases_are_refused(tmp_path):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ExperienceStoreError, match="not an experience database or is corrupt"):
        ExperienceStore(garbage)
    assert garbage.read_bytes() == b"this is not sqlite" * 100  # untouched
    foreign = tmp_path / "foreign.db"
    sqlite3.connect(foreign).execute("CREATE TABLE users (name TEXT)")
    with pytest.raises(ExperienceStoreError, match="database of something else .*users"):
        ExperienceStore(foreign)
    newer = tmp_path / "newer.db"
    ExperienceStore(newer).close()
    with sqlite3.connect(newer) as c:
        c.execute("PRAGMA user_version=99")
    with pytest.raises(ExperienceStoreError, match="newer conch_dna .schema 99"):
        ExperienceStore(newer)


QUESTIONS = [
    "Why does ice float on water?", "What is 17 times 3?", "Name three primary colours.", "What does a compiler do?",
    "Why do leaves change colour in autumn?", "What is a prime number?", "How do bees make honey?",
    "What is the boiling point of water?", "Explain what a variable is in programming.", "Why is the sea salty?",
    "What causes the seasons?", "How does a bicycle stay upright?", "What is photosynthesis?",
    "Why is the sky blue?", "What is a black hole?", "How do vaccines work?", "What is inflation?",
    "Why do cats purr?", "What is an algorithm?", "How are rainbows formed?", "What is gravity?",
    "Why do we dream?", "What is a democracy?", "How does a fridge keep food cold?",
]


@pytest.mark.real_model
def test_a_neuron_distilled_from_experience_beats_the_untrained_student(default_pair, tmp_path):
    """EGO (the real SmolLM2 teacher) answers questions, recorded under a new domain; self-distillation from
    that experience alone (its answers reused, none regenerated) makes a neuron of the 16-layer pruned student
    that, on the held-out experience, is closer to the teacher than the untrained student: lower KL, higher
    agreement, and its own answers more likely under the teacher."""
    import os

    from conch_dna.models import load_model
    from conch_dna.models.defaults import STUDENT_NAME, prepare_student
    from conch_dna.training.kd.evaluate import generation_metrics

    teacher, _ = default_pair
    student = prepare_student(STUDENT_NAME, os.environ.get("CONCH_CACHE_DIR"))
    cfg = KDConfig(iters=10, batch_size=4, learning_rate=1e-3, alpha=0.7, val_interval=10, checkpoint_interval=10,
                   max_seq_length=80, output_dir=str(tmp_path / "out"), lora={"rank": 8}, student_model_id=str(student),
                   eval_max_new_tokens=24, generation={"max_new_tokens": 32, "batch_size": 8})
    ego = EGO(str(teacher), config=cfg, experience=tmp_path / "exp.db")
    for q in QUESTIONS:
        ego.chat(q, max_tokens=32, domain="trivia")
    data = ego._training_data("trivia", None)
    assert data["answered"] and not data["prompts"]  # every stored answer is this model's: none regenerated
    assert 2 <= len(data["held_out"]) <= 10 and not set(data["held_out"]) & {p for p, _ in data["answered"]}
    handle = ego.self_distill("trivia")
    assert handle.wait(600) and handle.status == "succeeded", handle.error
    assert handle.result.generation.get("answered") == len(data["answered"])
    untrained, tok = load_model(str(student))
    before = generation_metrics(untrained, ego.model, tok, data["held_out"], max_new_tokens=24)
    after = handle.result.held_out  # the neuron, judged on the same held-out experience prompts
    figures = {k: (round(before[k], 3), round(after[k], 3)) for k in ("kl", "agreement", "teacher_nll", "repetition")}
    print("untrained -> neuron on held-out experience:", json.dumps(figures))
    assert after["prompts"] == len(data["held_out"])
    assert after["kl"] < 0.8 * before["kl"] and after["agreement"] > before["agreement"], figures
    assert after["teacher_nll"] < before["teacher_nll"], figures


def test_distill_when_n_new_experiences_arrive(tiny_pair, tmp_path):
    """The trigger: a background run once `every` new experiences of the domain have arrived; one run at a
    time (single flight); none again until `every` more arrive; none within `min_interval_s` of the last."""
    from conch_dna.cortex import NeuronRegistry
    from tests.conftest import PROMPTS

    teacher, student = tiny_pair
    cfg = KDConfig(iters=2, batch_size=2, val_interval=2, checkpoint_interval=2, output_dir=str(tmp_path / "out"),
                   max_seq_length=64, student_model_id=str(student), eval_max_new_tokens=0,
                   generation={"max_new_tokens": 8, "batch_size": 4})
    ego = EGO(str(teacher), registry=NeuronRegistry(tmp_path / "reg", base_model=student), config=cfg,
              experience=tmp_path / "exp.db")
    with pytest.raises(ValueError, match="every must be >= 1"):
        ego.distill_when("errands", every=0)
    ego.distill_when("errands", every=4, min_interval_s=0)
    for p in PROMPTS[:3]:
        ego.chat(p, max_tokens=6, domain="errands")
        ego.chat(p, max_tokens=6, domain="other")  # other domains do not count
    assert "errands" not in ego._runs
    ego.chat(PROMPTS[3], max_tokens=6, domain="errands")  # the 4th: a run starts
    first = ego._runs["errands"]
    for p in PROMPTS[4:8]:  # 4 more while it runs: no second run beside it
        ego.chat(p, max_tokens=6, domain="errands")
        assert ego._runs["errands"] is first or first.done
    assert first.wait(120) and first.status == "succeeded", first.error
    second = ego._maybe_distill("errands") or ego._runs["errands"]  # the 4 that came meanwhile are new: another run
    assert second is not first and second.wait(120) and second.status == "succeeded", second.error
    assert ego._maybe_distill("errands") is None  # nothing new since
    ego.distill_when("errands", every=1, min_interval_s=3600)
    ego._triggers["errands"]["started"] = time.monotonic()
    ego.chat("one more", max_tokens=6, domain="errands")
    assert ego._runs["errands"] is second  # debounced: not within min_interval_s of the last start


def test_cli_from_experience(tiny_pair, tmp_path):
    """`--from-experience DB`: the domain's stored answers are trained on as they are; a missing or corrupt
    database, a domain without experience and `--all` with it exit 2 before any work."""
    from tests.conftest import PROMPTS, cli_config

    teacher, student = tiny_pair
    ego = EGO(str(teacher), experience=tmp_path / "exp.db")
    for p in PROMPTS:
        ego.chat(p, max_tokens=8, domain="errands")
    (tmp_path / "kd.toml").write_text(cli_config(batch_size=2, iters=2, gen_batch=4))
    base = [sys.executable, "scripts/distill_neurons.py", "--teacher", str(teacher), "--student", str(student),
            "--config", str(tmp_path / "kd.toml"), "--output", str(tmp_path / "out"), "--no-register", "--log-json"]
    run = subprocess.run([*base, "--domain", "errands", "--from-experience", str(tmp_path / "exp.db")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "out/errands/result.json").read_text())
    assert result["generation"]["answered"] == sum(not held_out(p, 0.2) for p in PROMPTS)
    (tmp_path / "bad.db").write_bytes(b"garbage" * 100)
    for args, message in [(["--domain", "errands", "--from-experience", str(tmp_path / "none.db")], "does not exist"),
                          (["--domain", "errands", "--from-experience", str(tmp_path / "bad.db")], "is corrupt"),
                          (["--domain", "nothing", "--from-experience", str(tmp_path / "exp.db")], "holds no experience"),
                          (["--all", "--from-experience", str(tmp_path / "exp.db")], "applies to one --domain")]:
        r = subprocess.run([*base, *args], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
