"""EGO's experience: what it answered, per domain, in SQLite, for the neurons to learn from.

    store = ExperienceStore("models/experience.db")
    store.record("thinking", "Is 221 prime?", "No: 221 = 13 x 17.", model="<fingerprint>", answer_ids=[...])
    train, held_out = store.split("thinking")       # deduplicated by prompt; the held-out split never moves

Why SQLite (stdlib): one file, transactions, and several threads and processes writing at once. The
database runs in WAL mode (readers never block the writer) with a busy timeout, each write is one
transaction, so a kill -9 loses at most the record in flight and never corrupts the file. Each thread gets
its own connection (sqlite3 connections are not shared across threads). The schema is versioned with
`PRAGMA user_version`: an older file is migrated, a newer or foreign file is refused with a clear message.
`retention` bounds the store: past it, the oldest records of a domain are dropped on write.

The held-out split is a function of the prompt's text alone (a hash), so it stays fixed between runs and
versions of a neuron are judged on the same prompts however much experience arrives later.

Rows are checked when read, never trusted: a row whose fields have the wrong types or whose token ids are
not non-negative integers makes the store refuse to give data (`ExperienceStoreError` naming the row); the
distiller then checks the ids against the teacher's vocabulary. Training opens the database read-only
(`read_only=True`), so a database on read-only storage is read as it is. A write the storage refuses
(disk full, read-only) is an `ExperienceStoreError`, which EGO logs and counts without losing its answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1
# domain: NULL until tagged; answer_ids: JSON list of the answer's token ids (reused as teacher responses);
# model: fingerprint of the model that answered; created: unix time.
SCHEMA = """
CREATE TABLE IF NOT EXISTS experience (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    domain      TEXT,
    prompt      TEXT NOT NULL,
    answer      TEXT NOT NULL,
    answer_ids  TEXT,
    model       TEXT NOT NULL,
    created     REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS experience_domain ON experience (domain, id);
"""


class ExperienceStoreError(RuntimeError):
    """The database cannot be used (corrupt, not ours, made by a newer version); the message says what to do."""


@dataclass(frozen=True)
class Experience:
    id: int
    domain: str | None
    prompt: str
    answer: str
    answer_ids: tuple[int, ...] | None
    model: str
    created: float


def held_out(prompt: str, share: float) -> bool:
    """Whether `prompt` belongs to the held-out split: a hash of its text, the same in every run."""
    digest = hashlib.sha256(prompt.strip().encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


class ExperienceStore:
    """What EGO answered, per domain, in a SQLite database (WAL mode) that threads and processes write at once;
    the data its neurons are distilled from."""

    def __init__(self, path: str | os.PathLike, retention: int | None = 100_000, timeout: float = 30.0,
                 read_only: bool = False):
        """`retention`: the most records kept per domain (None: no bound); `timeout`: seconds a writer waits
        for another's transaction; `read_only`: open an existing database for reading only (training does)."""
        if retention is not None and retention < 1:
            raise ValueError(f"retention must be at least 1 record (or None for no bound), not {retention}")
        self.path, self.retention, self.timeout, self.read_only = Path(path), retention, timeout, read_only
        self._local = threading.local()
        if read_only:
            if not self.path.is_file():
                raise ExperienceStoreError(f"experience database {self.path} does not exist (or is not a file); give "
                                           "the path EGO(..., experience=...) writes")
        else:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ExperienceStoreError(f"cannot create the folder of {self.path} ({e.strerror}); choose another path") from e
        self._migrate()

    # ------------------------------------------------------------------------------------ connection

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None and self.read_only:
            db = self._connect_read_only()
            self._local.db = db
        if db is None:
            db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)  # explicit transactions
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a crash loses at most the last commits, never the file
            self._local.db = db
        return db

    def _connect_read_only(self) -> sqlite3.Connection:
        """mode=ro where SQLite can keep its shared-memory file beside the database; on read-only storage,
        where it cannot, the file is read as it is (immutable: no other process can be writing it there)."""
        uri = self.path.resolve().as_uri()
        db = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=self.timeout, isolation_level=None)
        try:
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return db
        except sqlite3.OperationalError:
            db.close()
        return sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True, timeout=self.timeout, isolation_level=None)

    def _migrate(self) -> None:
        try:
            db = self._db()
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.OperationalError as e:  # cannot open or lock it: the file may be perfectly good
            raise ExperienceStoreError(f"cannot open {self.path} for {'reading' if self.read_only else 'writing'} ({e}); "
                                       "check its folder's permissions and free space") from e
        except sqlite3.DatabaseError as e:
            raise ExperienceStoreError(f"{self.path} is not an experience database or is corrupt ({e}); move it "
                                       "away (a new one is created) or pass another path") from e
        if version > SCHEMA_VERSION:
            raise ExperienceStoreError(f"{self.path} was written by a newer conch_dna (schema {version}; this one reads "
                                       f"up to {SCHEMA_VERSION}); upgrade conch_dna or use another database")
        if version == 0 and tables - {"sqlite_sequence"}:
            raise ExperienceStoreError(f"{self.path} is an SQLite database of something else (tables: "
                                       f"{', '.join(sorted(tables))}); pass another path")
        if version < SCHEMA_VERSION and self.read_only:
            raise ExperienceStoreError(f"{self.path} holds no experience table yet (schema {version}); nothing to read")
        if version < SCHEMA_VERSION:
            with self._transaction() as db:  # another process may have migrated meanwhile: IF NOT EXISTS
                for statement in filter(str.strip, SCHEMA.split(";")):  # version 0 -> 1; later versions add steps
                    db.execute(statement)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self):
        if self.read_only:
            raise ExperienceStoreError(f"{self.path} was opened read-only; open it without read_only to record")
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlock between writers
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.OperationalError as e:  # disk full, read-only storage, a lock held too long
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise ExperienceStoreError(f"could not write to {self.path} ({e}); nothing was recorded") from e

    def close(self) -> None:
        """Close this thread's connection (others close when their thread's store is collected)."""
        if (db := getattr(self._local, "db", None)) is not None:
            db.close()
            self._local.db = None

    # ---------------------------------------------------------------------------------------- write

    def record(self, domain: str | None, prompt: str, answer: str, *, model: str,
               answer_ids: list[int] | None = None) -> int:
        """Store one answer EGO served; returns its id. One transaction: all of it or nothing."""
        if domain is not None:
            from conch_dna.neuron import check_name

            check_name(domain)
        with self._transaction() as db:
            cur = db.execute("INSERT INTO experience (domain, prompt, answer, answer_ids, model, created) "
                             "VALUES (?, ?, ?, ?, ?, ?)",
                             (domain, prompt, answer, json.dumps(list(answer_ids)) if answer_ids is not None else None,
                              model, time.time()))
            if self.retention is not None and domain is not None:
                db.execute("DELETE FROM experience WHERE domain = ? AND id <= (SELECT id FROM experience WHERE "
                           "domain = ? ORDER BY id DESC LIMIT 1 OFFSET ?)", (domain, domain, self.retention))
            return cur.lastrowid

    def tag(self, ids: list[int], domain: str) -> int:
        """Put records (e.g. answers served before anyone knew their domain) into `domain`; returns how many."""
        from conch_dna.neuron import check_name

        check_name(domain)
        with self._transaction() as db:
            return db.executemany("UPDATE experience SET domain = ? WHERE id = ?", [(domain, i) for i in ids]).rowcount

    # ----------------------------------------------------------------------------------------- read

    def records(self, domain: str, after: int = 0) -> list[Experience]:
        """The domain's records with an id above `after`, oldest first."""
        rows = self._db().execute("SELECT id, domain, prompt, answer, answer_ids, model, created FROM experience "
                                  "WHERE domain = ? AND id > ? ORDER BY id", (domain, after)).fetchall()
        return [self._checked(row) for row in rows]

    def _checked(self, row: tuple) -> Experience:
        """A row as an `Experience`, or `ExperienceStoreError` naming the row and what is wrong with it."""
        i, d, p, a, ids, m, c = row
        problem = None
        if not all(isinstance(x, str) for x in (p, a, m)) or not isinstance(c, int | float):
            problem = "a field of the wrong type"
        elif ids is not None:
            try:
                ids = json.loads(ids) if isinstance(ids, str) else None
            except ValueError:
                ids = None
            if not isinstance(ids, list) or not all(type(t) is int and t >= 0 for t in ids):
                problem = "answer_ids that are not a list of non-negative integers"
        if problem is not None:
            raise ExperienceStoreError(f"{self.path}: record {i} (domain {d!r}) is corrupt: {problem}. Delete that "
                                       "row, or move the database away, before training on it")
        return Experience(i, d, p, a, tuple(ids) if ids else None, m, c)

    def count(self, domain: str, after: int = 0) -> int:
        """How many records the domain has with an id above `after`."""
        return self._db().execute("SELECT COUNT(*) FROM experience WHERE domain = ? AND id > ?", (domain, after)).fetchone()[0]

    def domains(self) -> list[str]:
        """The domains that have records, sorted."""
        return [r[0] for r in self._db().execute("SELECT DISTINCT domain FROM experience WHERE domain IS NOT NULL ORDER BY domain")]

    def split(self, domain: str, held_out_share: float = 0.2) -> tuple[list[Experience], list[Experience]]:
        """(train, held_out): the domain's records deduplicated by prompt (the newest answer of each), split
        by a hash of the prompt (`held_out`), so the held-out prompts never move between runs."""
        newest: dict[str, Experience] = {}
        for e in self.records(domain):
            newest[e.prompt.strip()] = e
        train = [e for p, e in newest.items() if not held_out(p, held_out_share)]
        held = [e for p, e in newest.items() if held_out(p, held_out_share)]
        return train, held


# Held-out experience prompts a neuron is judged on (the oldest of the fixed split): a set that stops moving
# once this many exist, so that later versions are compared on the same prompts.
HELD_OUT_EXPERIENCES = 10


def training_data(store: ExperienceStore, domain: str, fingerprint: str) -> dict:
    """What a domain's experience gives a distillation run: `answered` (prompt, answer token ids) written by
    the model with this `fingerprint` (reused, no regeneration), `prompts` answered by another model (the
    teacher answers them again), and `held_out` prompts (the oldest of the fixed held-out split)."""
    train, held = store.split(domain)
    mine = [e for e in train if e.model == fingerprint and e.answer_ids]
    mine_ids = {e.id for e in mine}
    return {"answered": [(e.prompt, list(e.answer_ids)) for e in mine],
            "prompts": [e.prompt for e in train if e.id not in mine_ids],
            "held_out": [e.prompt for e in held[:HELD_OUT_EXPERIENCES]]}


def distillation_data(store: ExperienceStore | None, domain: str, fingerprint: str | None,
                      prompts: list[str] | None = None) -> dict:
    """`distill_domain`'s data for `domain`: `prompts` (default: the domain's own, config/domains.toml), its
    held-out prompts, plus, with a `store`, its experience (`training_data`): what EGO and the CLI's
    `--from-experience` both train on."""
    from conch_dna.training.kd.domains import load_domains, load_held_out

    domains = load_domains()
    data = {"prompts": list(domains.get(domain, [])) if prompts is None else list(prompts), "answered": [],
            "held_out": load_held_out(domain) if domain in domains else []}
    if store is not None:
        exp = training_data(store, domain, fingerprint)
        data = {k: data[k] + exp[k] for k in data}
    return data


__all__ = ["Experience", "ExperienceStore", "ExperienceStoreError", "SCHEMA_VERSION", "distillation_data", "held_out",
           "training_data"]
