"""EGO's experience store trusts no row it reads back, reads databases on read-only storage, and a write the
storage refuses never costs EGO the answer it already generated."""

import shutil
import sqlite3
import subprocess
import sys

import pytest

from conch_dna.ego import EGO
from conch_dna.ego.experience import ExperienceStore, ExperienceStoreError
from tests.conftest import PROMPTS, cli_config


@pytest.fixture
def experience(tiny_pair, tmp_path):
    teacher, _ = tiny_pair
    ego = EGO(str(teacher), experience=tmp_path / "exp.db")
    for p in PROMPTS:
        ego.chat(p, max_tokens=6, domain="errands")
    return tmp_path / "exp.db"


def corrupt(db, answer_ids):
    with sqlite3.connect(db) as c:
        c.execute("UPDATE experience SET answer_ids = ? WHERE id = (SELECT MIN(id) FROM experience)", (answer_ids,))


def distil_from(tiny_pair, tmp_path, db):
    teacher, student = tiny_pair
    (tmp_path / "kd.toml").write_text(cli_config(batch_size=2, iters=1, gen_batch=4))
    return subprocess.run([sys.executable, "scripts/distill_neurons.py", "--teacher", str(teacher), "--student", str(student),
                           "--config", str(tmp_path / "kd.toml"), "--output", str(tmp_path / "out"), "--no-register",
                           "--domain", "errands", "--from-experience", str(db)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("ids, message", [("[999999]", "outside the teacher's vocabulary"), ("[-1]", "record 1"),
                                          ('["a"]', "record 1"), ("[1.5]", "record 1"), ("{", "record 1")])
def test_a_row_with_bad_token_ids_is_refused_with_its_row_not_a_crash(tiny_pair, tmp_path, experience, ids, message):
    corrupt(experience, ids)
    run = distil_from(tiny_pair, tmp_path, experience)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]


def test_rows_are_checked_when_read(experience):
    corrupt(experience, "[3, -7]")
    store = ExperienceStore(experience)
    with pytest.raises(ExperienceStoreError, match="record 1 .*non-negative integers"):
        store.records("errands")


def mount(path, options):
    path.mkdir(exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


def test_a_database_on_read_only_storage_is_read_not_called_corrupt(tiny_pair, tmp_path, experience):
    ro = tmp_path / "ro"
    if not mount(ro, "size=4m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        with sqlite3.connect(experience) as c:  # as a database is archived: its log folded into the file
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        shutil.copyfile(experience, ro / "exp.db")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        store = ExperienceStore(ro / "exp.db", read_only=True)
        assert len(store.records("errands")) == len(PROMPTS)
        with pytest.raises(ExperienceStoreError, match="cannot open .* for writing|could not write"):
            ExperienceStore(ro / "exp.db").record("errands", "p", "a", model="m")
        run = distil_from(tiny_pair, tmp_path, ro / "exp.db")
        assert run.returncode == 0, run.stderr[-2000:]
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def test_a_full_disk_costs_the_record_never_the_answer(tiny_pair, tmp_path):
    teacher, _ = tiny_pair
    small = tmp_path / "small"
    if not mount(small, "size=96k"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        ego = EGO(str(teacher), experience=small / "exp.db")
        try:
            with open(small / "filler", "wb", buffering=0) as f:  # fill the disk
                while True:
                    f.write(b"\0" * 4096)
        except OSError:
            pass
        answers = [ego.chat(p * 50, max_tokens=6, domain="errands") for p in PROMPTS[:3]]
        assert all(isinstance(a, str) for a in answers)
        assert ego.unrecorded >= 1
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)
