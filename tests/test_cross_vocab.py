"""Cross-tokenizer distillation: SentencePiece conversion, detection, alignment, vocabulary mapping, loss."""

import math
import os

import mlx.core as mx
import numpy as np
import pytest

from conch_dna.training.kd.cross_examples import align_spans, boundaries, encode_with_offsets
from conch_dna.training.kd.cross_vocab import (
    CrossTokenizerError,
    VocabMap,
    build_vocab_map,
    compare_tokenizers,
    cross_token_divergence,
    token_bytes,
    vmap_arrays,
)
from conch_dna.training.kd.losses import DIVERGENCES, LossSpec, token_divergence

TRICKY = [
    "Hello, world! The quick brown fox.",
    "naïve café — 日本語のテキスト, Привет мир, 🙂🚀 done",
    "   leading spaces,\ttabs\t\tand\n\n\nnewline runs   \n  ",
    "Numbers: 3.14159, 1,000,000 and 2026-11-24T16:49:00Z; 12345678901234567890",
    "def f(x):\n    return x ** 2  # square\n\n\tif x >= 10: print(f'{x:>8}')",
    "a\u00a0non-breaking space, zero\u200bwidth, combining e\u0301 and CJK 中文 mixed with English",
]


@pytest.fixture(scope="module")
def gemma_folder():
    from conch_dna.models.defaults import prepare_gemma3

    return prepare_gemma3(os.environ.get("CONCH_CACHE_DIR"))


@pytest.fixture(scope="module")
def smol_tok(default_pair):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    return load_tokenizer(default_pair[0])


@pytest.fixture(scope="module")
def gemma_tok(gemma_folder):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    return load_tokenizer(gemma_folder)


# ------------------------------------------------------------------------ SentencePiece from GGUF


def spm_reference(text: str, tokens: list[str], scores: list[float], types: list[int]) -> list[int]:
    """llama.cpp's SentencePiece-BPE tokenizer, written out plainly: user-defined/control tokens first (longest
    match), then per fragment: spaces -> "▁", repeatedly merge the adjacent pair whose result scores highest
    (leftmost on ties), then unknown pieces fall back to <0xNN> byte tokens."""
    vocab = {t: i for i, t in enumerate(tokens)}
    atomic = sorted((t for t, ty in zip(tokens, types) if ty in (3, 4)), key=len, reverse=True)
    out, buf, i = [], "", 0

    def flush(fragment):
        syms = list(fragment.replace(" ", "\u2581"))
        while True:
            best = None
            for j in range(len(syms) - 1):
                piece = syms[j] + syms[j + 1]
                if piece in vocab and types[vocab[piece]] == 1 and (best is None or scores[vocab[piece]] > best[0]):
                    best = (scores[vocab[piece]], j)
            if best is None:
                break
            j = best[1]
            syms[j : j + 2] = [syms[j] + syms[j + 1]]
        for s in syms:
            if s in vocab:
                out.append(vocab[s])
            else:
                out.extend(vocab[f"<0x{b:02X}>"] for b in s.encode("utf-8"))

    while i < len(text):
        match = next((a for a in atomic if text.startswith(a, i)), None)
        if match:
            if buf:
                flush(buf)
                buf = ""
            out.append(vocab[match])
            i += len(match)
        else:
            buf += text[i]
            i += 1
    if buf:
        flush(buf)
    return out


def test_sentencepiece_tokenizer_matches_llama_cpp_algorithm():
    from conch_dna.models.defaults import gemma3_gguf_path
    from conch_dna.models.gguf_convert import build_tokenizer, read_metadata

    meta = {k: v for k, v in read_metadata(gemma3_gguf_path()).items() if k.startswith("tokenizer.")}
    tok = build_tokenizer(meta)
    tokens, scores, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"], meta["tokenizer.ggml.token_type"]
    for text in TRICKY + ["<start_of_turn>user\nHi<end_of_turn>\n", "\U0001f9ec\U0001fae0 rare emoji bytes"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == spm_reference(text, tokens, scores, types), text
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_gemma3_converts_into_a_working_model(gemma_folder):
    """The converted Gemma-3-270m predicts real text well (norm shift, q/k norms, sliding window right)."""
    from conch_dna.models import load_model
    from conch_dna.training.kd.evaluate import text_perplexity

    model, tok = load_model(gemma_folder)
    text = "/usr/share/doc/python3.11/html/_sources/tutorial/controlflow.rst.txt"
    if not os.path.isfile(text):
        text = math.__file__ if math.__file__ else os.__file__
    ppl = text_perplexity(model, tok, text, max_tokens=256)["ppl"]
    assert ppl < 40, ppl  # measured 13.4 on 512 tokens; a wrong norm offset or RoPE gives thousands
    assert 106 in tok.eos_token_ids  # <end_of_turn> stops generation in chat
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


# -------------------------------------------------------------------------------------- detection


def test_detection_identical_padded_different(smol_tok, gemma_tok, tmp_path):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    assert compare_tokenizers(smol_tok, smol_tok)["relation"] == "identical"
    different = compare_tokenizers(smol_tok, gemma_tok)
    assert different["relation"] == "different"
    assert different["probes_encoded_alike"] < different["probes"]
    # The same tokenizer with extra tokens appended (a family member with more added tokens): "padded".
    backend = Tokenizer.from_str(smol_tok._tokenizer.backend_tokenizer.to_str())
    backend.add_tokens(["<extra_tool_call>", "<extra_tool_result>"])
    wider = PreTrainedTokenizerFast(tokenizer_object=backend)
    padded = compare_tokenizers(smol_tok, wider)
    assert padded["relation"] == "padded" and padded["student_vocab"] == padded["teacher_vocab"] + 2


# -------------------------------------------------------------------------------------- alignment


def _prefix_bytes(table, ids, upto):
    return b"".join(table[i] for i in ids[: upto + 1])


@pytest.mark.parametrize("text", TRICKY)
def test_alignment_pairs_cover_the_same_text(smol_tok, gemma_tok, text):
    """At every aligned pair both token prefixes spell exactly text[:c]; every shared boundary is found."""
    t_table, _ = token_bytes(smol_tok)
    s_table, _ = token_bytes(gemma_tok)
    t_ids, t_off = encode_with_offsets(smol_tok, text)
    s_ids, s_off = encode_with_offsets(gemma_tok, text)
    pairs = align_spans(t_off, s_off, len(text))
    assert pairs[0] == (0, -1, -1)
    for c, ti, si in pairs:
        want = text[:c].encode("utf-8")
        assert _prefix_bytes(t_table, t_ids, ti) == want
        assert _prefix_bytes(s_table, s_ids, si) == want
    # Completeness, from bytes alone (independent of offsets): every character offset at which both token
    # sequences end a token cleanly is a pair.
    def clean_ends(table, ids):
        ends, n = set(), 0
        for i in ids:
            n += len(table[i])
            ends.add(n)
        return ends
    char_at = {len(text[:c].encode("utf-8")): c for c in range(len(text) + 1)}
    shared = {char_at[b] for b in clean_ends(t_table, t_ids) & clean_ends(s_table, s_ids) if b in char_at}
    assert {c for c, _, _ in pairs} == {0} | {c for c in shared if c < len(text)}
    assert len(pairs) >= 0.3 * len(s_ids)


def test_boundaries_skip_tokens_inside_one_character():
    # Three byte pieces of one emoji share the span (4, 5); only the last ends the character.
    offsets = [(0, 4), (4, 5), (4, 5), (4, 5), (5, 9)]
    assert boundaries(offsets) == {0: -1, 4: 0, 5: 3, 9: 4}


def test_a_tokenizer_without_offsets_is_refused(smol_tok):
    class SlowTokenizer:  # e.g. a Python sentencepiece tokenizer: no Rust backend, no offsets
        is_fast = False

        def encode(self, text):
            return [1, 2, 3]

    with pytest.raises(CrossTokenizerError, match="offsets"):
        encode_with_offsets(SlowTokenizer(), "hello")
    with pytest.raises(CrossTokenizerError, match="fast"):
        token_bytes(SlowTokenizer())


def test_a_tokenizer_with_an_unknown_alphabet_is_refused():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "hello": 1, "##lo": 2}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    wp.decoder = decoders.WordPiece()
    with pytest.raises(CrossTokenizerError, match="WordPiece"):
        token_bytes(PreTrainedTokenizerFast(tokenizer_object=wp))


# ------------------------------------------------------------------------------------- vocabulary


def test_vocab_map_pairs_tokens_that_spell_the_same_bytes(smol_tok, gemma_tok):
    vm = build_vocab_map(smol_tok, gemma_tok)
    t_table, _ = token_bytes(smol_tok)
    s_table, s_byte = token_bytes(gemma_tok)
    assert len(set(vm.teacher_ids.tolist())) == vm.size == len(set(vm.student_ids.tolist()))  # one to one
    eos_pair = (smol_tok.eos_token_id, sorted(gemma_tok.eos_token_ids)[0])
    for t, s in zip(vm.teacher_ids.tolist(), vm.student_ids.tolist()):
        if (t, s) != eos_pair:
            assert t_table[t] == s_table[s]
    assert eos_pair in set(zip(vm.teacher_ids.tolist(), vm.student_ids.tolist()))
    # "A" maps to Gemma's normal piece, not its <0x41> byte-fallback duplicate.
    a = gemma_tok.convert_tokens_to_ids("A")
    assert (smol_tok.convert_tokens_to_ids("A"), a) in set(zip(vm.teacher_ids.tolist(), vm.student_ids.tolist()))
    assert 0.9 < vm.figures["teacher_vocab_mapped"] < 1.0 and 0.1 < vm.figures["student_vocab_mapped"] < 0.3


def test_align_vocab_sizes_mapped_strategy(smol_tok, gemma_tok):
    from conch_dna.training.kd import align_vocab_sizes

    t = mx.random.normal((2, 3, 49152), key=mx.random.key(0))
    s = mx.random.normal((2, 3, 262144), key=mx.random.key(1))
    at, as_ = align_vocab_sizes(t, s, strategy="mapped", teacher_tokenizer=smol_tok, student_tokenizer=gemma_tok,
                                temperature=2.0)
    assert at.shape == as_.shape
    # Coarse-graining keeps every probability: the buckets sum to 1 at the same temperature.
    for full, bucket in ((t, at), (s, as_)):
        assert mx.allclose(mx.logsumexp(bucket / 2.0, axis=-1), mx.logsumexp(full / 2.0, axis=-1), atol=1e-5)
    with pytest.raises(VocabMismatchErrorType()):
        align_vocab_sizes(t, s, strategy="slice", teacher_tokenizer=smol_tok, student_tokenizer=gemma_tok)


def VocabMismatchErrorType():
    from conch_dna.training.kd import VocabMismatchError

    return VocabMismatchError


# ------------------------------------------------------------------------------------------- loss


def _identity_vmap(v: int) -> dict:
    ids = np.arange(v, dtype=np.int32)
    return vmap_arrays(VocabMap(ids, ids, v, v))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_identity_mapping_equals_the_same_tokenizer_loss(divergence):
    """When every token maps to itself, the cross-tokenizer loss is exactly the ordinary KD loss (and ULD 0)."""
    t = mx.random.normal((3, 5, 40), key=mx.random.key(2)) * 3
    s = mx.random.normal((3, 5, 40), key=mx.random.key(3)) * 3
    vm = _identity_vmap(40)
    got = cross_token_divergence(t, s, vm, LossSpec(temperature=2.0, divergence=divergence))
    want = token_divergence(t, s, 2.0, divergence)
    assert mx.allclose(got["kd"], want, rtol=1e-5, atol=1e-6)
    assert mx.all(got["uld"] == 0).item() and mx.allclose(got["coverage"], mx.ones((3, 5)), atol=1e-6)
    g_got = mx.grad(lambda x: cross_token_divergence(t, x, vm, LossSpec(temperature=2.0, divergence=divergence))["kd"].sum())(s)
    g_want = mx.grad(lambda x: token_divergence(t, x, 2.0, divergence).sum())(s)
    assert mx.allclose(g_got, g_want, rtol=1e-4, atol=1e-6)


def test_mapped_part_against_a_float64_reference():
    rng = np.random.default_rng(0)
    vt, vs = 30, 50
    t_ids = np.array([0, 3, 4, 9, 20], np.int32)
    s_ids = np.array([7, 1, 40, 2, 33], np.int32)
    vm = vmap_arrays(VocabMap(t_ids, s_ids, vt, vs))
    t, s = rng.normal(size=(4, vt)) * 2, rng.normal(size=(4, vs)) * 2
    got = cross_token_divergence(mx.array(t, dtype=mx.float32), mx.array(s, dtype=mx.float32), vm,
                                 LossSpec(temperature=1.5, uld_weight=0.0))["kd"]

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    p, q = softmax(t / 1.5), softmax(s / 1.5)
    pb = np.concatenate([p[:, t_ids], 1 - p[:, t_ids].sum(-1, keepdims=True)], -1)
    qb = np.concatenate([q[:, s_ids], 1 - q[:, s_ids].sum(-1, keepdims=True)], -1)
    want = 1.5**2 * (pb * (np.log(pb) - np.log(qb))).sum(-1)
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5)


def test_uld_is_blind_to_which_unmapped_token_holds_the_mass():
    """Unmapped tokens have no counterpart: permuting them changes nothing; moving mass between sizes does."""
    vm = vmap_arrays(VocabMap(np.arange(4, dtype=np.int32), np.arange(4, dtype=np.int32), 12, 12))
    t = mx.array([[2.0, 1.0, 0.5, 0.0, 3.0, 2.5, -1.0, 0.0, 1.0, -2.0, 0.3, 0.1]])
    perm = mx.array([0, 1, 2, 3, 11, 10, 9, 8, 7, 6, 5, 4])
    same = cross_token_divergence(t, t[:, perm], vm, LossSpec(temperature=1.0))
    assert same["kd"].item() < 1e-6
    flat = mx.concatenate([t[:, :4], mx.full((1, 8), float(mx.logsumexp(t[:, 4:]).item() - math.log(8)))], axis=-1)
    moved = cross_token_divergence(t, flat, vm, LossSpec(temperature=1.0))
    assert moved["mapped"].item() < 1e-5 and moved["uld"].item() > 0.05  # same remainder mass, other shape


def test_cross_objective_masks_padding_rows():
    from conch_dna.training.kd.cross_vocab import CrossTargets, cross_objective

    vm = vmap_arrays(VocabMap(np.arange(10, dtype=np.int32), np.arange(10, dtype=np.int32) * 2, 16, 24))
    tokens = mx.array([[1, 2, 3, 4, 5, 6]])
    mask = mx.array([[False, False, True, True, True, True]])
    s = mx.random.normal((1, 6, 24), key=mx.random.key(5))
    rows = mx.random.normal((1, 3, 16), key=mx.random.key(6))
    garbage = mx.concatenate([rows[:, :2], mx.full((1, 1, 16), mx.inf)], axis=1)  # padding row holds inf
    tg = CrossTargets(garbage, mx.array([[1, 3, 0]]), mx.array([[True, True, False]]), vm)
    ref = CrossTargets(rows[:, :2], mx.array([[1, 3]]), mx.array([[True, True]]), vm)
    out = cross_objective(s, tg, tokens, mask)
    want = cross_objective(s, ref, tokens, mask)
    assert mx.allclose(out["loss"], want["loss"]).item() and out["aligned"].item() == 2
    g = mx.grad(lambda x: cross_objective(x, tg, tokens, mask)["loss"])(s)
    assert mx.all(mx.isfinite(g)).item()


# -------------------------------------------------------------------------------- distiller, end to end


@pytest.fixture(scope="module")
def cross_pair(tmp_path_factory):
    """Two tiny models whose tokenizers differ (BPE trained to 384 vs 512 tokens)."""
    from conch_dna.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("cross")
    teacher = build_tiny_model(root / "teacher", num_layers=2, hidden_size=64, seed=0, vocab_size=384)
    student = build_tiny_model(root / "student", num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1,
                               intermediate_size=64, seed=1, vocab_size=512)
    return teacher, student


def test_distiller_detects_different_tokenizers_and_trains(cross_pair, kd_config):
    from mlx_lm import load

    from conch_dna.training.kd import TrueKnowledgeDistiller
    from tests.conftest import PROMPTS

    teacher, student = cross_pair
    cfg = kd_config(teacher_model_id=str(teacher), student_model_id=str(student), iters=8, val_interval=4,
                    generation={"max_new_tokens": 16, "batch_size": 4, "temperature": 1.0})
    r = TrueKnowledgeDistiller(config=cfg).distill_domain("thinking", PROMPTS)
    x = r.cross_tokenizer
    assert x["method"] == "mapped" and x["teacher_vocab"] == 384 and x["student_vocab"] == 512
    assert 0 < x["positions_aligned"] <= 1 and 0 < x["val_coverage"] <= 1 and x["mapped_tokens"] > 300
    assert r.final_val_kd < r.initial_val_kd
    # The adapter is mlx-lm's format on the student.
    model, _ = load(str(student), adapter_path=r.adapter_path)
    assert model(mx.array([[1, 2, 3]])).shape[-1] == 512


def test_cross_tokenizer_refuses_unsupported_settings(cross_pair, kd_config):
    from conch_dna.training.kd import TrueKnowledgeDistiller
    from tests.conftest import PROMPTS

    teacher, student = cross_pair
    for over, match in ((dict(teacher_targets="cache"), "online"), (dict(on_policy_lambda=0.5), "on_policy_lambda"),
                        (dict(own_answers="on"), "own_answers")):
        cfg = kd_config(teacher_model_id=str(teacher), student_model_id=str(student), **over)
        with pytest.raises(CrossTokenizerError, match=match):
            TrueKnowledgeDistiller(config=cfg).distill_domain("thinking", PROMPTS[:4])
