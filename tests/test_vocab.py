"""align_vocab_sizes (cross_vocab.py): padded vocabularies of one tokenizer are aligned; different tokenizers are refused."""

import mlx.core as mx
import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from conch_dna.models.tiny import SPECIAL_TOKENS, build_tokenizer
from conch_dna.training.kd import VocabMismatchError, align_vocab_sizes, check_same_tokenizer, compute_kd_loss


def _hf(tok):
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def same_pair():
    return _hf(build_tokenizer(384)), _hf(build_tokenizer(384))


def test_slice_to_real_vocab_after_verifying(same_pair):
    t_tok, s_tok = same_pair
    teacher = mx.random.normal((2, 3, 400))  # padded to 400 (e.g. 152064)
    student = mx.random.normal((2, 3, 392))  # padded to 392 (e.g. 151936)
    t, s = align_vocab_sizes(teacher, student, "slice", t_tok, s_tok)
    assert t.shape[-1] == s.shape[-1] == 384
    assert np.array_equal(np.array(t), np.array(teacher[..., :384]))
    assert np.isfinite(compute_kd_loss(t, s).item())


def test_pad_with_neg_inf(same_pair):
    t_tok, s_tok = same_pair
    t, s = align_vocab_sizes(mx.zeros((1, 2, 390)), mx.zeros((1, 2, 386)), "pad", t_tok, s_tok)
    assert s.shape[-1] == 390 and np.all(np.array(s[..., 386:]) == -np.inf)
    assert np.isfinite(compute_kd_loss(t, s).item())


def test_equal_widths_pass_through():
    x = mx.zeros((1, 2, 10))
    assert align_vocab_sizes(x, x)[0] is x


def test_different_tokenizers_are_refused():
    t_tok = _hf(build_tokenizer(384))
    # A tokenizer trained to another size assigns different strings to the same ids.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other.decoder = decoders.ByteLevel()
    other.train_from_iterator(["completely different text for another vocabulary " * 20],
                              trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS[::-1], show_progress=False))
    with pytest.raises(VocabMismatchError, match="disagree on"):
        check_same_tokenizer(t_tok, _hf(other))
    with pytest.raises(VocabMismatchError):
        align_vocab_sizes(mx.zeros((1, 1, 384)), mx.zeros((1, 1, 300)), "slice", t_tok, _hf(other))


def test_widths_differ_without_tokenizers_is_an_error():
    with pytest.raises(VocabMismatchError, match="pass teacher_tokenizer"):
        align_vocab_sizes(mx.zeros((1, 1, 5)), mx.zeros((1, 1, 6)))
    with pytest.raises(ValueError, match="unknown strategy"):
        align_vocab_sizes(mx.zeros((1, 1, 5)), mx.zeros((1, 1, 6)), "project")
