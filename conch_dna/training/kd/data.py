"""Teacher data: domain prompts -> teacher responses -> token examples -> cached top-k soft targets.

Data flows one way: `load_prompts` / `DOMAIN_PROMPTS` give prompts; `generate_examples` has the teacher
answer them through the chat template (batched); with cached targets, `compute_sparse_targets` runs the
teacher once over every example and `TeacherCache` stores its top-k logits, ids and row log-sum-exp in
safetensors shards; the trainer picks batches with `batch_order` / `pad_batch` and gets targets from the
cache or, by default (online), from the live teacher.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import tomllib
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
import structlog

from conch_dna._faults import fault_point
from conch_dna.atomic import atomic_folder, sha256_file
from conch_dna.defaults import default_file
from conch_dna.inputs import MB, read_input
from conch_dna.training.kd.losses import SparseTargets

log = structlog.get_logger(__name__)


# Inputs larger than these are no prompt list a person wrote (`inputs.read_input` refuses them unread).
PROMPTS_MAX_BYTES, DOMAINS_MAX_BYTES = 64 * MB, 16 * MB


class DataError(ValueError):
    """Prompts or examples are unusable; the message says which file/prompt and what to do."""


# ------------------------------------------------------------------------------------------ prompts


def domains_file() -> Path:
    """The domains file in use: `CONCH_KD_DOMAINS_FILE`, else `config/domains.toml` of the working directory,
    else the package's own (`conch_dna/defaults/domains.toml`)."""
    if env := os.environ.get("CONCH_KD_DOMAINS_FILE"):
        return Path(env)
    local = Path("config/domains.toml")
    return local if local.is_file() else default_file("domains.toml")


def load_domains(path: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """{domain: prompts} from a domains TOML file (tables with a `prompts` list)."""
    path = Path(path) if path else domains_file()
    try:
        data = tomllib.loads(read_input(path, "domains file", DOMAINS_MAX_BYTES, DataError).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"domains file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from e
    except tomllib.TOMLDecodeError as e:
        raise DataError(f"domains file {path} is not valid TOML: {e}") from e
    domains = {}
    for name, table in data.items():
        prompts = table.get("prompts") if isinstance(table, dict) else None
        if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts) or not prompts:
            raise DataError(f"domain [{name}] in {path} needs a non-empty `prompts` list of non-empty strings")
        domains[name] = [p.strip() for p in prompts]
    return domains


def load_held_out(domain: str, path: str | os.PathLike | None = None) -> list[str]:
    """The domain's `held_out` prompts (never trained on; they judge the neuron's own answers), or []."""
    path = Path(path) if path else domains_file()
    table = tomllib.loads(read_input(path, "domains file", DOMAINS_MAX_BYTES, DataError).decode("utf-8")).get(domain)
    held = table.get("held_out", []) if isinstance(table, dict) else []
    if not isinstance(held, list) or not all(isinstance(p, str) and p.strip() for p in held):
        raise DataError(f"domain [{domain}] in {path}: `held_out` must be a list of non-empty strings")
    trained = set(load_domains(path).get(domain, []))
    if leaked := [p for p in held if p.strip() in trained]:
        raise DataError(f"domain [{domain}] in {path}: held-out prompt {leaked[0]!r} is also a training prompt")
    return [p.strip() for p in held]


def load_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a file: JSONL (objects with "prompt", or JSON strings) or plain text, one per line.

    JSONL when the suffix is .jsonl/.json, or when every line parses as JSON; otherwise each line is a prompt
    (so a plain prompt that happens to start with a quote stays a prompt)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"prompt file {path} is a folder; give a file with one prompt per line (or JSONL)")
    raw = read_input(path, "prompt file", PROMPTS_MAX_BYTES, DataError)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"prompt file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from e
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"prompt file {path} has no prompts; write one prompt per line (or JSONL with a \"prompt\" field)")
    by_suffix = path.suffix in (".jsonl", ".json")
    parsed = []
    for i, ln in enumerate(lines, 1):
        try:
            parsed.append(json.loads(ln))
        except json.JSONDecodeError as e:
            if by_suffix:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg}); a {path.suffix} file is read as JSONL, one "
                                "JSON object per line (rename it .txt for one plain prompt per line)") from e
            return [ln.strip() for ln in lines]  # not every line is JSON: plain text
    prompts = []
    for i, obj in enumerate(parsed, 1):
        p = obj.get("prompt") if isinstance(obj, dict) else obj
        if not isinstance(p, str) or not p.strip():
            raise DataError(f"{path}:{i}: read as JSONL (every line is JSON), but this line is not a non-empty string "
                            "or an object with a \"prompt\" string")
        prompts.append(p.strip())
    return prompts


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_name(name: str, what: str = "domain") -> str:
    """A domain or neuron name, checked once before anything is written: it becomes a folder name under
    --output and the registry, so it may not hold a path separator or start with a dot (`../escaped`)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise DataError(f"invalid {what} name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a "
                        "letter or digit (it names a folder)")
    return name


# ----------------------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class Example:
    """One training sequence: prompt + response token ids; the loss applies to the response only."""

    tokens: tuple[int, ...]
    prompt_len: int
    prompt: str = field(default="", compare=False)  # the prompt's text (re-tokenized for another tokenizer)

    @property
    def response_len(self) -> int:
        return len(self.tokens) - self.prompt_len


def eos_id(tokenizer) -> int | None:
    """The EOS id appended to answers that stopped by themselves (the smallest of the tokenizer's EOS ids)."""
    ids = getattr(tokenizer, "eos_token_ids", None)
    return sorted(ids)[0] if ids else None


def chat_prompt_ids(tokenizer, prompt: str, system_prompt: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    return list(tokenizer.encode(prompt))


def generate_examples(model, tokenizer, prompts: list[str], gen, max_seq_length: int, seed: int = 0,
                      lock=None, on_batch=None) -> tuple[list[Example], dict]:
    """The teacher answers each prompt (batched sampling); returns examples and throughput figures.

    A prompt that leaves no room for a response within `max_seq_length` is an error naming it.
    Responses that end with EOS keep the EOS token, so students learn to stop. `lock` (if given) is held
    around each batch only, so that other users of a shared live model (EGO answering) are not starved.
    `on_batch(done)` (if given) is called after each batch with the number of prompts answered so far; an
    exception it raises (a cancel) stops the generation.
    """
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    if not prompts:
        raise DataError("no prompts given: pass at least one prompt (or use a domain from config/domains.toml)")
    prompt_ids = [chat_prompt_ids(tokenizer, p, gen.system_prompt) for p in prompts]
    for p, ids in zip(prompts, prompt_ids):
        if len(ids) >= max_seq_length - 1:
            raise DataError(
                f"prompt of {len(ids)} tokens does not fit max_seq_length={max_seq_length} with room for an answer: "
                f"{p[:60]!r}... Shorten it or raise max_seq_length."
            )
    eos = eos_id(tokenizer)
    mx.random.seed(seed)
    sampler = make_sampler(temp=gen.temperature, top_p=gen.top_p if gen.temperature > 0 else 0.0)
    examples, n_gen = [], 0
    t0 = time.perf_counter()
    for start in range(0, len(prompt_ids), gen.batch_size):
        chunk = prompt_ids[start : start + gen.batch_size]
        budgets = [min(gen.max_new_tokens, max_seq_length - len(ids)) for ids in chunk]
        with lock or nullcontext():
            out = batch_generate(model, tokenizer, chunk, max_tokens=budgets, sampler=sampler, return_token_ids=True)
        fault_point("generation")
        for ids, resp, budget, text in zip(chunk, out.token_ids, budgets, prompts[start : start + gen.batch_size]):
            resp = list(resp)
            n_gen += len(resp)
            if eos is not None and len(resp) < budget:
                resp.append(eos)  # stopped on EOS (batch_generate drops the stop token)
            if not resp:
                continue
            examples.append(Example(tuple(ids + resp)[:max_seq_length], len(ids), text))
        if on_batch is not None:
            on_batch(min(start + gen.batch_size, len(prompt_ids)))
    seconds = time.perf_counter() - t0
    stats = {"samples": len(examples), "generated_tokens": n_gen, "seconds": seconds,
             "tokens_per_second": n_gen / seconds if seconds > 0 else 0.0,
             "tokens": sum(len(e.tokens) for e in examples)}
    return examples, stats


def answered_examples(tokenizer, answered: list[tuple[str, list[int]]], system_prompt: str | None,
                      max_seq_length: int) -> list[Example]:
    """Examples from answers the teacher already wrote (EGO's experience: prompt, answer token ids), cut to
    `max_seq_length`; prompts that leave no room for an answer are skipped."""
    out = []
    for prompt, ids in answered:
        prompt_ids = chat_prompt_ids(tokenizer, prompt, system_prompt)
        if len(prompt_ids) < max_seq_length - 1 and ids:
            out.append(Example(tuple(prompt_ids + list(ids))[:max_seq_length], len(prompt_ids), prompt))
    return out


def continue_prompts(model, tokenizer, examples: list[Example], max_new_tokens: int, temperature: float,
                     top_p: float, max_seq_length: int, lock=None) -> list[Example]:
    """New examples: the same prompts, answered by `model` (on-policy data: the student writes)."""
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    prompts = [list(e.tokens[: e.prompt_len]) for e in examples]
    budgets = [max(1, min(max_new_tokens, max_seq_length - len(p))) for p in prompts]
    sampler = make_sampler(temp=temperature, top_p=top_p if temperature > 0 else 0.0)
    eos = eos_id(tokenizer)
    with lock or nullcontext():
        out = batch_generate(model, tokenizer, prompts, max_tokens=budgets, sampler=sampler, return_token_ids=True)
    new = []
    for p, resp, budget, old in zip(prompts, out.token_ids, budgets, examples):
        resp = list(resp) + ([eos] if eos is not None and len(resp) < budget else [])
        new.append(Example(tuple(p + resp)[:max_seq_length], len(p), old.prompt) if resp else old)
    return new


def split_examples(examples: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded split; at least one training example, and one validation example when asked for any."""
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = min(len(examples) - 1, max(1 if val_fraction > 0 else 0, round(len(examples) * val_fraction)))
    val = [examples[i] for i in sorted(order[:n_val])]
    train = [examples[i] for i in sorted(order[n_val:])]
    return train, val


# ------------------------------------------------------------------------------------------ batches


def pad_batch(examples: list[Example], pad_id: int = 0, multiple: int = 1) -> tuple[mx.array, mx.array]:
    """tokens [B, L] (right-padded) and loss_mask [B, L] (true on response tokens only).

    `multiple` rounds L up (a compiled step recompiles for every new shape; padding is masked and, being
    on the right of a causal model, changes nothing)."""
    width = max(len(e.tokens) for e in examples)
    width = -(-width // multiple) * multiple
    tokens = np.full((len(examples), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(examples), width), dtype=bool)
    for i, e in enumerate(examples):
        tokens[i, : len(e.tokens)] = e.tokens
        mask[i, e.prompt_len : len(e.tokens)] = True
    return mx.array(tokens), mx.array(mask)


def batch_order(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Example indices of global batch `step`: epochs are seeded permutations, so any step is recomputable
    from (seed, step) alone. That is what makes resuming exact without saving a data cursor."""
    per_epoch = max(1, n // batch_size) if n >= batch_size else 1
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    if n < batch_size:  # tiny data sets: wrap around
        return [int(perm[i % n]) for i in range(batch_size)]
    return [int(i) for i in perm[k * batch_size : (k + 1) * batch_size]]


# ------------------------------------------------------------------------------------- teacher cache


def fingerprint_model(model) -> str:
    """A cheap content fingerprint of a loaded model: shapes plus per-tensor sums (computed on device)."""
    from mlx.utils import tree_flatten

    h = hashlib.sha256()
    for name, p in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        x = p.astype(mx.float32)
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(np.array(mx.stack([x.sum(), (x * x).sum()])).tobytes())
    return h.hexdigest()


def fingerprint_tokenizer(tokenizer) -> str:
    tok = getattr(tokenizer, "_tokenizer", tokenizer)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps([vocab, getattr(tokenizer, "chat_template", None)]).encode()).hexdigest()


def cache_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def teacher_logits(model, tokens: mx.array) -> mx.array:
    return model(tokens).astype(mx.float32)


def compute_sparse_targets(model, examples: list[Example], top_k: int, batch_size: int = 8, lock=None) -> list[SparseTargets]:
    """Run the teacher over each example and keep top-k logits, ids and the row log-sum-exp per token."""
    from conch_dna.training.kd.losses import topk_targets

    out = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        tokens, _ = pad_batch(chunk)
        with lock or nullcontext():
            t = topk_targets(teacher_logits(model, tokens), top_k)
            mx.eval(t)
        for i, e in enumerate(chunk):
            n = len(e.tokens)
            out.append(SparseTargets(t.logits[i, :n], t.indices[i, :n], t.logsumexp[i, :n]))
    return out


def tail_logsumexp(t: SparseTargets) -> mx.array:
    """log of the teacher's (unnormalised) mass outside the top-k, in float32, from exact values."""
    lse_k = mx.logsumexp(t.logits.astype(mx.float32), axis=-1)
    frac = mx.minimum(mx.exp(lse_k - t.logsumexp), 1.0 - 2.0**-23)  # floored as in losses._sparse_logprobs
    return (t.logsumexp + mx.log1p(-frac)).astype(mx.float32)


class TeacherCache:
    """Examples and their top-k teacher targets, stored as safetensors shards in one folder.

    Logits are stored as float16 (half the bytes; a logit needs no more), ids as uint16 when the
    vocabulary fits (else int32). Instead of the full-row log-sum-exp we store the log-sum-exp of the
    *tail* (float32): the tail holds ~1e-3 of the mass, far below float16's resolution of the top-k
    probabilities, so 1 - sum(top-k) recomputed from rounded logits would be noise. The folder is written to a temporary sibling and
    renamed, so a cache is either complete or absent.
    """

    SHARD_EXAMPLES = 256

    def __init__(self, examples: list[Example], targets: list[SparseTargets], meta: dict):
        self.examples, self.targets, self.meta = examples, targets, meta

    def save(self, folder: Path) -> Path:
        vocab = self.meta.get("vocab_size", 1 << 31)
        id_dtype = mx.uint16 if vocab <= 65536 else mx.int32
        n_shards = max(1, math.ceil(len(self.examples) / self.SHARD_EXAMPLES))
        with atomic_folder(folder) as tmp:
            for s in range(n_shards):
                lo, hi = s * self.SHARD_EXAMPLES, (s + 1) * self.SHARD_EXAMPLES
                ex, tg = self.examples[lo:hi], self.targets[lo:hi]
                arrays = {
                    "tokens": mx.array(np.concatenate([np.array(e.tokens, np.int32) for e in ex])),
                    "lengths": mx.array([len(e.tokens) for e in ex], dtype=mx.int32),
                    "prompt_lens": mx.array([e.prompt_len for e in ex], dtype=mx.int32),
                }
                if tg:  # online training stores the teacher's answers only
                    arrays["logits"] = mx.concatenate([t.logits for t in tg]).astype(mx.float16)
                    arrays["indices"] = mx.concatenate([t.indices for t in tg]).astype(id_dtype)
                    arrays["tail_logsumexp"] = mx.concatenate([tail_logsumexp(t) for t in tg])
                mx.save_safetensors(str(tmp / f"shard-{s:05d}.safetensors"), arrays)
            digests = [sha256_file(tmp / f"shard-{i:05d}.safetensors") for i in range(n_shards)]
            (tmp / "meta.json").write_text(json.dumps({**self.meta, "shards": n_shards, "examples": len(self.examples),
                                                       "prompts": [e.prompt for e in self.examples],
                                                       "sha256": digests}, indent=2))
        return Path(folder)

    @classmethod
    def load(cls, folder: Path) -> TeacherCache:
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text())
        examples, targets = [], []
        prompts = iter(meta.get("prompts") or [])
        for s in range(meta["shards"]):
            path = folder / f"shard-{s:05d}.safetensors"
            digests = meta.get("sha256")
            if digests and sha256_file(path) != digests[s]:
                raise DataError(f"teacher cache shard {path} is corrupt (sha256 mismatch); delete {folder} to rebuild it")
            try:
                a = mx.load(str(path))
            except Exception as e:
                raise DataError(f"teacher cache shard {path} is unreadable ({e}); delete {folder} to rebuild it") from e
            lengths = np.array(a["lengths"]).tolist()
            prompt_lens = np.array(a["prompt_lens"]).tolist()
            tokens = np.array(a["tokens"])
            off = 0
            for n, p in zip(lengths, prompt_lens):
                examples.append(Example(tuple(int(t) for t in tokens[off : off + n]), int(p), next(prompts, "")))
                if "logits" not in a:
                    off += n
                    continue
                top = a["logits"][off : off + n].astype(mx.float32)
                # The full-row logsumexp, rebuilt from the *rounded* top-k and the exact tail: the tail
                # mass the loss derives from it is then exact, whatever float16 did to the top-k.
                lse = mx.logaddexp(mx.logsumexp(top, axis=-1), a["tail_logsumexp"][off : off + n])
                targets.append(SparseTargets(top, a["indices"][off : off + n].astype(mx.int32), lse))
                off += n
        if len(examples) != meta["examples"] or len(targets) not in (0, len(examples)):
            raise DataError(f"teacher cache {folder} is incomplete ({len(examples)} of {meta['examples']} examples); delete it to rebuild")
        return cls(examples, targets, meta)

    def bytes_per_token(self) -> float:
        k = self.targets[0].logits.shape[-1] if self.targets else 0
        id_bytes = 2 if self.meta.get("vocab_size", 1 << 31) <= 65536 else 4
        return k * (2 + id_bytes) + 4


def pad_sparse(targets: list[SparseTargets], width: int) -> SparseTargets:
    """Stack per-example sparse targets into [B, width, k], padding with neutral rows (masked anyway)."""
    k = targets[0].logits.shape[-1]
    rows_l, rows_i, rows_z = [], [], []
    for t in targets:
        pad = width - t.logits.shape[0]
        rows_l.append(mx.pad(t.logits, [(0, pad), (0, 0)]))
        rows_i.append(mx.pad(t.indices, [(0, pad), (0, 0)]) if pad else t.indices)
        # Padding rows: logits 0 with logsumexp log(k) describe a valid (uniform-over-top-k) distribution.
        rows_z.append(mx.concatenate([t.logsumexp, mx.full((pad,), math.log(k))]) if pad else t.logsumexp)
    indices = mx.stack(rows_i)
    if k > 1:  # padding rows need distinct ids, or take/put_along_axis would collide
        pad_ids = mx.broadcast_to(mx.arange(k, dtype=indices.dtype), indices.shape)
        valid = mx.arange(width)[None, :, None] < mx.array([t.logits.shape[0] for t in targets])[:, None, None]
        indices = mx.where(valid, indices, pad_ids)
    return SparseTargets(mx.stack(rows_l), indices, mx.stack(rows_z))
