"""Corpus KD: the teacher scores real text (dense targets, no generation), as Minitron and DistillKit heal
pruned or quantized students.

    tokens = tokenize_corpus(tokenizer, "docs/", cache_root)         # once; cached by content
    train, val = corpus_windows(tokens, window=512, val_windows=8)  # read-only Sequences of Examples

`tokenize_corpus` streams a text file or a folder of them through the tokenizer in chunks of about 1 MB and
appends the ids to one flat uint32 file (nanoGPT's `train.bin`), with EOS between documents, written under a
temporary name and renamed, so a killed run leaves nothing half-written. `CorpusWindows` maps that file
(`np.memmap`) and serves fixed-length windows as `Example`s: the trainer indexes it as it indexes teacher
answers, and the corpus never sits in memory. `mix` interleaves corpus windows with a domain's teacher
answers at a chosen share.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from conch_dna.atomic import atomic_write
from conch_dna.neuron import DataError
from conch_dna.training.kd.examples import Example

CHUNK_CHARS = 1 << 20  # text handed to the tokenizer at once: bounded memory, few calls
TOKENS_FILE = "tokens.u32"


def corpus_files(source: str | os.PathLike) -> list[Path]:
    """The text files of `source` (a file, or every file under a folder, sorted; hidden ones skipped)."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"text corpus {path} does not exist; give a text file or a folder of text files")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"text corpus folder {path} holds no files")
    return files


def _documents(files: list[Path]) -> Iterator[Iterator[str]]:
    """Per file, its text in chunks of about CHUNK_CHARS that end at a line break (files that are not UTF-8
    text are skipped: a folder of documentation often holds an image or two)."""
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                head = fh.read(CHUNK_CHARS)
        except UnicodeDecodeError:
            continue
        if "\x00" in head:
            continue

        def chunks(f=f):
            with open(f, encoding="utf-8", errors="replace") as fh:
                carry = ""
                while block := fh.read(CHUNK_CHARS):
                    text = carry + block
                    cut = text.rfind("\n") + 1 or len(text)
                    carry = text[cut:]
                    yield text[:cut]
                if carry:
                    yield carry

        yield chunks()


def corpus_key(tokenizer_fingerprint: str, files: list[Path], max_tokens: int | None) -> str:
    """What the token file depends on: the tokenizer and each file's path, size and mtime."""
    h = hashlib.sha256(tokenizer_fingerprint.encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    h.update(str(max_tokens).encode())
    return h.hexdigest()[:24]


def tokenize_corpus(tokenizer, source: str | os.PathLike, cache: str | os.PathLike, *,
                    max_tokens: int | None = None, eos: int | None = None) -> Path:
    """Token ids of the corpus `source` in `cache`/<corpus_key>/tokens.u32 (uint32), written once; returns
    its path. Reuses the file when its meta.json says it is complete. Stops after `max_tokens` tokens if given."""
    from conch_dna.training.kd.teacher_cache import fingerprint_tokenizer

    files = corpus_files(source)
    key = corpus_key(fingerprint_tokenizer(tokenizer), files, max_tokens)
    folder = Path(cache) / key
    meta_path, out = folder / "meta.json", folder / TOKENS_FILE
    if meta_path.is_file() and out.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key and out.stat().st_size == 4 * meta.get("tokens", -1):
            return out
    folder.mkdir(parents=True, exist_ok=True)
    encode = _plain_encoder(tokenizer)
    n = docs = 0

    def write(tmp: Path) -> None:
        nonlocal n, docs
        with open(tmp, "wb") as fh:
            for doc in _documents(files):
                for text in doc:
                    ids = encode(text)
                    if max_tokens is not None:
                        ids = ids[: max_tokens - n]
                    np.asarray(ids, dtype=np.uint32).tofile(fh)
                    n += len(ids)
                    if max_tokens is not None and n >= max_tokens:
                        return
                docs += 1
                if eos is not None:
                    np.asarray([eos], dtype=np.uint32).tofile(fh)
                    n += 1

    atomic_write(out, write)
    if n < 2:
        out.unlink(missing_ok=True)
        raise DataError(f"text corpus {source} has no text to learn from (no UTF-8 text files, or they are empty)")
    atomic_write(meta_path, lambda p: p.write_text(json.dumps(
        {"key": key, "source": str(source), "files": len(files), "documents": docs, "tokens": n}, indent=2)))
    return out


def _plain_encoder(tokenizer):
    """ids of a text chunk without special tokens (a BOS per 1 MB chunk would be noise in the stream)."""
    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    if (fast := getattr(inner, "backend_tokenizer", None)) is not None:  # the Rust tokenizer: no length warning
        return lambda text: fast.encode(text, add_special_tokens=False).ids
    try:
        inner.encode("a", add_special_tokens=False)
        return lambda text: inner.encode(text, add_special_tokens=False)
    except TypeError:
        return tokenizer.encode


class CorpusWindows(Sequence):
    """Windows `[start + i * window, start + (i + 1) * window)` of a token file, as Examples (every token
    after the first is scored: the teacher's distribution at each position is the target)."""

    def __init__(self, tokens_path: str | os.PathLike, window: int, start: int = 0, count: int | None = None):
        if window < 2:
            raise ValueError(f"corpus windows need at least 2 tokens, got window={window}")
        self.path, self.window = Path(tokens_path), window
        self._ids = np.memmap(self.path, dtype=np.uint32, mode="r")
        available = (len(self._ids) - start) // window
        self.start, self.count = start, available if count is None else min(count, available)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -self.count <= i < self.count:
            raise IndexError(f"window {i} of {self.count}")
        i %= self.count
        a = self.start + i * self.window
        # No prompt: every token is text to learn (the first is scored by nothing: nothing predicts it).
        return Example(tuple(int(t) for t in self._ids[a : a + self.window]), 0)

    @property
    def tokens(self) -> int:
        return self.count * self.window


def corpus_windows(tokens_path: str | os.PathLike, window: int, val_windows: int) -> tuple[CorpusWindows, CorpusWindows]:
    """(train, val): the last `val_windows` windows are held out, the rest train. Raises `DataError` when the
    corpus is too short for one training window."""
    total = CorpusWindows(tokens_path, window)
    val_windows = min(val_windows, max(0, len(total) - 1))
    if len(total) - val_windows < 1:
        raise DataError(f"the text corpus has {len(total._ids)} tokens, fewer than one window of {window}: "
                        "give more text or lower max_seq_length")
    train = CorpusWindows(tokens_path, window, 0, len(total) - val_windows)
    return train, CorpusWindows(tokens_path, window, train.count * window, val_windows)


class CorpusWithAnswers(Sequence):
    """Corpus windows and a domain's teacher answers in one index space, the answers repeated so that about
    `answer_share` of uniformly drawn indices are answers (a large corpus would otherwise drown them)."""

    def __init__(self, corpus: Sequence, answers: Sequence, answer_share: float):
        self.corpus, self.answers = corpus, answers
        if not answers or answer_share <= 0:
            self.repeats = 0
        else:
            self.repeats = max(1, round(answer_share / max(1e-9, 1 - answer_share) * len(corpus) / len(answers)))

    def __len__(self) -> int:
        return len(self.corpus) + self.repeats * len(self.answers)

    def __getitem__(self, i: int) -> Example:
        if i < 0:
            i += len(self)
        if i < len(self.corpus):
            return self.corpus[i]
        if i >= len(self):
            raise IndexError(i)
        return self.answers[(i - len(self.corpus)) % len(self.answers)]
