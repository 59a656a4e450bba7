"""amp_lib.data: the shipped corpus, the character tokenizer, token windows and synthetic tensors."""

from __future__ import annotations

import gzip
import hashlib

import pytest
import torch

from amp_lib.data import CORPUS_PATH, CORPUS_SHA256, TRAIN_FRACTION, CharTokenizer, TensorBatches, TokenBatches, corpus

# --- corpus --------------------------------------------------------------------------------------


def test_corpus_is_the_shipped_tiny_shakespeare_file():
    text = corpus()
    assert CORPUS_SHA256 == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # the published hash
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == CORPUS_SHA256
    assert len(text.encode("utf-8")) == 1_115_394 and text.startswith("First Citizen:\nBefore we proceed any further")
    assert text == gzip.decompress(CORPUS_PATH.read_bytes()).decode() and CORPUS_PATH.parent.name == "amp_lib"
    assert len(set(text)) == 65  # nanoGPT's character vocabulary for this corpus
    assert corpus() is text  # read once per process
    assert TRAIN_FRACTION == 0.9


# --- tokenizer -----------------------------------------------------------------------------------


def test_char_tokenizer_vocabulary_is_the_sorted_characters():
    tok = CharTokenizer.for_text("hello world")
    assert tok.vocab_size == len(set("hello world"))
    assert list(tok.chars) == sorted(set("hello world"))
    ids = tok.encode("low droll")
    assert "".join(tok.chars[i] for i in ids.tolist()) == "low droll"  # each id indexes its character


def test_tokenizer_ids_are_embedding_indices():
    ids = CharTokenizer.for_text("abca").encode("cab")
    assert ids.dtype == torch.long and ids.tolist() == [2, 0, 1]
    empty = CharTokenizer.for_text("abca").encode("")  # torch.tensor([]) alone would be a float tensor
    assert empty.dtype == torch.long and empty.numel() == 0


# --- token windows -------------------------------------------------------------------------------


def test_token_batches_are_deterministic_windows():
    tokens = torch.arange(100)
    a = TokenBatches(tokens, num_batches=3, batch_size=2, seq_len=5, seed=7)
    b = TokenBatches(tokens, num_batches=3, batch_size=2, seq_len=5, seed=7)
    c = TokenBatches(tokens, num_batches=3, batch_size=2, seq_len=5, seed=8)
    assert len(a) == 3 and (a.batch_size, a.seq_len) == (2, 5)
    for i in range(3):
        assert torch.equal(a[i][0], b[i][0])
        x, y = a[i]
        assert x.shape == y.shape == (2, 5)
        assert torch.equal(y, x + 1)  # contiguous windows of arange: targets are the next tokens
    assert any(not torch.equal(a[i][0], c[i][0]) for i in range(3))
    assert torch.equal(a[4][0], a[1][0])  # wraps around


def test_token_windows_reach_both_ends_of_the_stream_and_never_past_them():
    tokens = torch.arange(7)  # seq_len 4: windows of 5 tokens (inputs and targets) start at 0, 1 or 2
    batches = TokenBatches(tokens, num_batches=64, batch_size=4, seq_len=4, seed=0)
    firsts = {int(v) for i in range(len(batches)) for v in batches[i][0][:, 0]}
    assert firsts == {0, 1, 2}
    last_targets = {int(v) for i in range(len(batches)) for v in batches[i][1][:, -1]}
    assert max(last_targets) == 6  # the stream's last token is a target too
    x, y = batches[0]
    assert torch.equal(y[:, :-1], x[:, 1:]) and x.dtype == torch.long


def test_token_stream_must_hold_one_window_and_its_targets():
    exact = TokenBatches(torch.arange(6), num_batches=2, batch_size=3, seq_len=5, seed=0)  # 6 == 5 + 1
    x, y = exact[0]
    assert x.tolist() == [[0, 1, 2, 3, 4]] * 3 and y.tolist() == [[1, 2, 3, 4, 5]] * 3
    with pytest.raises(ValueError) as info:
        TokenBatches(torch.arange(6), num_batches=1, batch_size=1, seq_len=6, seed=0)
    assert str(info.value) == "seq_len=6 is too long for a stream of 6 tokens"


# --- synthetic tensors ---------------------------------------------------------------------------


def test_tensor_batches():
    a = TensorBatches(num_batches=2, batch_size=4, in_features=3, num_classes=5, seed=0)
    b = TensorBatches(num_batches=2, batch_size=4, in_features=3, num_classes=5, seed=0)
    assert len(a) == 2
    assert a[0][0].shape == (4, 3) and a[0][1].shape == (4,)
    assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[1][1], b[1][1])
    assert torch.equal(a[2][0], a[0][0])
    assert a[0][1].dtype == torch.long and int(a[0][1].max()) < 5


def test_tensor_batches_with_a_teacher_seed_share_that_seeds_labelling_rule():
    common = {"num_batches": 3, "batch_size": 64, "in_features": 6, "num_classes": 4}
    teacher = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))  # seed 0's teacher: its first draw
    trained_on = TensorBatches(seed=0, **common)
    held_out = TensorBatches(seed=5, teacher_seed=0, **common)
    own_teacher = TensorBatches(seed=5, **common)
    for batches in (trained_on, held_out):
        for i in range(3):
            x, y = batches[i]
            assert torch.equal(y, (x @ teacher).argmax(-1))
    assert not torch.equal(held_out[0][0], trained_on[0][0])  # other inputs
    x, y = own_teacher[0]
    assert not torch.equal(y, (x @ teacher).argmax(-1))  # without teacher_seed: a teacher drawn from `seed`


@pytest.mark.parametrize("kind", ["tokens", "tensors"])
def test_batches_are_put_on_the_given_device(kind):
    meta = torch.device("meta")  # stands in for a GPU on a CPU build
    if kind == "tokens":
        batches = TokenBatches(torch.arange(50), num_batches=2, batch_size=2, seq_len=4, seed=0, device=meta)
    else:
        batches = TensorBatches(num_batches=2, batch_size=2, in_features=3, num_classes=2, seed=0, device=meta)
    assert {t.device for i in range(2) for t in batches[i]} == {meta}
