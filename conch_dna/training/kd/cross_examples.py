"""Teacher data for a student with another tokenizer: the teacher's answers re-tokenized for the student, and
the positions where both tokenizations predict the same text (`cross_vocab` has the loss over them).

A character offset c where both token sequences have a boundary is a place where both models predict "the
text from c on": the teacher's logits at its token ending at c and the student's at its token ending at c
are compared (plus the start of the response, and the end, where both predict their end-of-sequence token).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from conch_dna.neuron import DataError, chat_prompt_ids, eos_id, hf_tokenizer
from conch_dna.training.kd.cross_vocab import CrossTokenizerError
from conch_dna.training.kd.examples import Example


def stop_tokens(tokenizer) -> set[int]:
    ids = getattr(tokenizer, "eos_token_ids", None)
    if isinstance(ids, int):
        return {ids}
    return set(ids) if ids else ({eos_id(tokenizer)} - {None})


# ------------------------------------------------------------------------------------ alignment


def encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` (no special tokens added) and each token's character span in `text`."""
    hf = hf_tokenizer(tokenizer)
    if not getattr(hf, "is_fast", False):
        raise CrossTokenizerError(f"{type(hf).__name__} gives no character offsets (not a fast tokenizer); "
                                  "cross-tokenizer alignment needs a tokenizer.json")
    enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def boundaries(offsets: list[tuple[int, int]]) -> dict[int, int]:
    """Character offset -> index of the token that ends there, for offsets where one token ends and the
    next begins (-1: before the first token). Tokens inside one character (byte pieces of an emoji) share
    its span and are not boundaries until the last of them.
    """
    out = {0: -1}
    for i, (_, end) in enumerate(offsets):
        nxt = offsets[i + 1][0] if i + 1 < len(offsets) else None
        if nxt is None or nxt >= end:
            out[end] = i
    return out


def align_spans(teacher_offsets, student_offsets, text_len: int) -> list[tuple[int, int, int]]:
    """(offset, teacher token index, student token index) at every shared boundary before the end."""
    bt, bs = boundaries(teacher_offsets), boundaries(student_offsets)
    return [(c, bt[c], bs[c]) for c in sorted(bt.keys() & bs.keys()) if c < text_len]


@dataclass(frozen=True)
class CrossExample:
    """One response in both tokenizations. `pairs` holds (teacher position, student position) whose logits
    predict the same text; the student's Example is what the trainer batches (its CE uses every token)."""

    student: Example
    teacher: Example
    pairs: tuple[tuple[int, int], ...]

    @property
    def tokens(self):
        return self.student.tokens

    @property
    def prompt_len(self):
        return self.student.prompt_len


def cross_examples(teacher_examples, teacher_tokenizer, student_tokenizer, max_seq_length: int,
                   system_prompt: str | None = None) -> tuple[list[CrossExample], dict]:
    """Re-tokenize the teacher's responses for the student and align both; returns examples and figures."""
    t_eos, s_eos = eos_id(teacher_tokenizer), eos_id(student_tokenizer)
    t_stop = stop_tokens(teacher_tokenizer)
    out, n_resp_tokens, n_aligned = [], 0, 0
    for ex in teacher_examples:
        if not ex.prompt:
            raise DataError("teacher data has no prompt texts (made by an older version): delete the teacher "
                            "cache folder so that it is generated again")
        resp = list(ex.tokens[ex.prompt_len:])
        finished = bool(resp) and resp[-1] in t_stop
        text = teacher_tokenizer.decode(resp[:-1] if finished else resp)
        t_ids, t_off = encode_with_offsets(teacher_tokenizer, text)
        s_ids, s_off = encode_with_offsets(student_tokenizer, text)
        t_prompt = list(ex.tokens[: ex.prompt_len])
        s_prompt = chat_prompt_ids(student_tokenizer, ex.prompt, system_prompt)
        t_seq = (t_prompt + t_ids + ([t_eos] if finished else []))[:max_seq_length]
        s_seq = (s_prompt + s_ids + ([s_eos] if finished else []))[:max_seq_length]
        pairs = [(len(t_prompt) + ti, len(s_prompt) + si) for _, ti, si in align_spans(t_off, s_off, len(text))]
        if finished:  # both predict their end-of-sequence token after the last character
            pairs.append((len(t_prompt) + len(t_ids) - 1, len(s_prompt) + len(s_ids) - 1))
        # A position is usable only if the token it predicts is inside both (truncated) sequences.
        pairs = tuple((t, s) for t, s in pairs if t + 1 < len(t_seq) and s + 1 < len(s_seq))
        if len(s_seq) <= len(s_prompt):
            continue
        out.append(CrossExample(Example(tuple(s_seq), len(s_prompt), ex.prompt), Example(tuple(t_seq), len(t_prompt), ex.prompt), pairs))
        n_resp_tokens += len(s_seq) - len(s_prompt)
        n_aligned += len(pairs)
    stats = {"examples": len(out), "student_response_tokens": n_resp_tokens, "aligned_positions": n_aligned,
             "positions_aligned": round(n_aligned / max(n_resp_tokens, 1), 4)}
    return out, stats


def pad_pairs(examples: list[CrossExample]) -> tuple[mx.array, mx.array, mx.array]:
    """teacher positions, student positions [B, P] and validity, P = the most pairs in the batch."""
    width = max(1, max(len(e.pairs) for e in examples))
    t_pos = np.zeros((len(examples), width), np.int32)
    s_pos = np.zeros((len(examples), width), np.int32)
    valid = np.zeros((len(examples), width), bool)
    for b, e in enumerate(examples):
        if e.pairs:
            p = np.array(e.pairs, np.int32)
            t_pos[b, : len(p)], s_pos[b, : len(p)], valid[b, : len(p)] = p[:, 0], p[:, 1], True
    return mx.array(t_pos), mx.array(s_pos), mx.array(valid)
