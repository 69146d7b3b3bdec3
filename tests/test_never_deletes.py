"""Nothing a user owns is ever deleted: a destination folder is replaced only when it holds nothing but what
this tool wrote there; anything else is refused before any work (or, when asked, kept under another name)."""

import json
import subprocess
import sys

import pytest

from conch_dna.atomic import OWNER_FILE, ForeignFolderError, atomic_folder, foreign_entries, remove_folder


def user_folder(path):
    path.mkdir()
    (path / "thesis.txt").write_text("years of work")
    (path / "photos").mkdir()
    (path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    return path


def test_a_folder_it_wrote_is_replaced_and_lists_its_files(tmp_path):
    dest = tmp_path / "out"
    with atomic_folder(dest) as tmp:
        (tmp / "a.json").write_text("1")
    assert json.loads((dest / OWNER_FILE).read_text())["files"] == ["a.json"]
    with atomic_folder(dest) as tmp:
        (tmp / "b.json").write_text("2")
    assert sorted(p.name for p in dest.iterdir()) == [OWNER_FILE, "b.json"]


def test_a_folder_with_other_files_is_refused_before_any_work(tmp_path):
    dest = user_folder(tmp_path / "mine")
    worked = []
    with pytest.raises(ForeignFolderError, match="thesis.txt"):
        with atomic_folder(dest):
            worked.append(True)
    assert not worked and (dest / "thesis.txt").read_text() == "years of work" and (dest / "photos" / "cat.jpg").exists()


def test_a_file_added_to_a_folder_it_wrote_makes_it_the_users(tmp_path):
    dest = tmp_path / "out"
    with atomic_folder(dest) as tmp:
        (tmp / "a.json").write_text("1")
    (dest / "notes.md").write_text("mine")
    assert foreign_entries(dest) == ["notes.md"]
    with pytest.raises(ForeignFolderError):
        with atomic_folder(dest) as tmp:
            (tmp / "a.json").write_text("2")
    with pytest.raises(ForeignFolderError):
        remove_folder(dest)
    assert (dest / "notes.md").read_text() == "mine"


def test_keep_foreign_renames_instead_of_deleting(tmp_path):
    dest = user_folder(tmp_path / "mine")
    with atomic_folder(dest, keep_foreign=True) as tmp:
        (tmp / "model.json").write_text("{}")
    (kept,) = tmp_path.glob("mine.kept-*")
    assert (kept / "thesis.txt").read_text() == "years of work" and (kept / "photos" / "cat.jpg").exists()
    assert (dest / "model.json").exists()


def test_folders_written_before_the_owner_file_are_still_recognised(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "conch_model.json").write_text(json.dumps({"files": {"config.json": "ab"}}))
    assert foreign_entries(model) == []
    ckpt = tmp_path / "checkpoint_000002"
    ckpt.mkdir()
    (ckpt / "adapters.safetensors").write_bytes(b"x")
    (ckpt / "state.json").write_text(json.dumps({"step": 2, "sha256": {"adapters.safetensors": "cd"}}))
    assert foreign_entries(ckpt) == []


def models_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "conch_dna.models", *args], capture_output=True, text=True, cwd=cwd)


def test_gguf_conversion_refuses_a_users_folder_and_one_holding_its_source(tmp_path):
    from conch_dna.models.defaults import smollm2_gguf_path

    dest = user_folder(tmp_path / "mine")
    run = models_cli("--gguf", str(smollm2_gguf_path()), "--out", str(dest), cwd=tmp_path)
    assert run.returncode == 2 and "thesis.txt" in run.stderr and "--force" in run.stderr, run.stderr
    assert (dest / "thesis.txt").read_text() == "years of work" and (dest / "photos" / "cat.jpg").exists()
    # the source inside the destination: refused even with --force
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    gguf = src_dir / "m.gguf"
    gguf.write_bytes(smollm2_gguf_path().read_bytes())
    for extra in ([], ["--force"]):
        run = models_cli("--gguf", str(gguf), "--out", str(src_dir), *extra, cwd=tmp_path)
        assert run.returncode == 2 and "holds the GGUF" in run.stderr, run.stderr
    assert gguf.stat().st_size == smollm2_gguf_path().stat().st_size


def test_gguf_conversion_with_force_keeps_the_users_files_and_replaces_its_own(tmp_path):
    from conch_dna.models.defaults import smollm2_gguf_path
    from conch_dna.models.gguf_convert import verify_model_folder

    dest = user_folder(tmp_path / "mine")
    run = models_cli("--gguf", str(smollm2_gguf_path()), "--out", str(dest), "--force", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    (kept,) = tmp_path.glob("mine.kept-*")
    assert (kept / "thesis.txt").read_text() == "years of work" and (kept / "photos" / "cat.jpg").exists()
    verify_model_folder(dest)
    again = models_cli("--gguf", str(smollm2_gguf_path()), "--out", str(dest), cwd=tmp_path)  # its own: replaced
    assert again.returncode == 0, again.stderr
    verify_model_folder(dest)
    assert len(list(tmp_path.glob("mine.kept-*"))) == 1
