"""Tests for the data pipeline: corpora, tokenizer, splits and replayable batches."""

import time

import pytest
import torch

from ds_checkfree.data import (
    DEFAULT_CORPUS,
    ByteTokenizer,
    DataBundle,
    MicroBatches,
    Splits,
    build_data,
    load_corpus,
    split_tokens,
    validation_batches,
)

TEXT = "Some words for a tiny corpus. " * 40


def _stream(n=5000):
    """A token stream whose values equal their positions mod 256, so windows are checkable."""
    return torch.arange(n, dtype=torch.long) % 256


def _window_set(batch):
    """Identify each row of a batch by its full token content."""
    x, _ = batch
    return {tuple(row.tolist()) for row in x}


# --- tokenizer -----------------------------------------------------------

def test_tokenizer_round_trip_ascii_and_unicode():
    tok = ByteTokenizer()
    text = "To be, or not to be — ça va? 日本語 🎭"
    ids = tok.encode(text)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.numel() == len(text.encode("utf-8"))
    assert int(ids.max()) < tok.vocab_size == 256
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text


def test_tokenizer_empty_and_broken_bytes():
    tok = ByteTokenizer()
    assert tok.encode("").numel() == 0
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"
    with pytest.raises(ValueError):
        tok.decode([300])


# --- corpus ---------------------------------------------------------------

def test_default_corpus_is_shakespeare():
    assert DEFAULT_CORPUS == "shakespeare"
    text = load_corpus()
    assert len(text) > 5_000_000
    assert "Hamlet" in text and "Cleopatra" in text
    assert load_corpus("shakespeare") == text


def test_text_file_and_directory(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("alpha text", encoding="utf-8")
    assert load_corpus(str(f)) == "alpha text"
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("second", encoding="utf-8")
    (d / "a.txt").write_text("first", encoding="utf-8")
    (d / "sub" / "c.txt").write_text("nested", encoding="utf-8")
    (d / "skip.md").write_text("not text corpus", encoding="utf-8")
    assert load_corpus(str(d)) == "first\n\nsecond\n\nnested"


def test_hf_dataset_sources(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": ["row one", "row two"], "body": ["b1", "b2"]}).save_to_disk(str(path))
    assert load_corpus(f"hf:{path}") == "row one\n\nrow two"
    assert load_corpus(f"hf:{path}#body") == "b1\n\nb2"
    assert load_corpus(str(path)) == "row one\n\nrow two"
    with pytest.raises(ValueError, match="missing_col"):
        load_corpus(f"hf:{path}#missing_col")


def test_hf_dataset_dict_uses_train_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "dd"
    dd = datasets.DatasetDict({
        "validation": datasets.Dataset.from_dict({"text": ["val row"]}),
        "train": datasets.Dataset.from_dict({"text": ["train row"]}),
    })
    dd.save_to_disk(str(path))
    assert load_corpus(f"hf:{path}") == "train row"
    assert load_corpus(str(path)) == "train row"


def test_build_data_from_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": [TEXT] * 10}).save_to_disk(str(path))
    bundle = build_data(f"hf:{path}", seq_len=16, micro_batch_size=2, val_fraction=0.2)
    expected = len(("\n\n".join([TEXT] * 10)).encode("utf-8"))
    assert bundle.num_train_tokens + bundle.num_val_tokens == expected


def test_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match="gone"):
        load_corpus(f"hf:{tmp_path / 'gone'}")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no text"):
        load_corpus(str(empty))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="emptydir"):
        load_corpus(str(tmp_path / "emptydir"))


# --- splits ---------------------------------------------------------------

def test_split_is_deterministic_and_disjoint():
    tokens = torch.arange(1000)
    a, b = split_tokens(tokens, 0.1), split_tokens(tokens, 0.1)
    assert isinstance(a, Splits)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.val.numel() == 100 and a.train.numel() == 900
    assert torch.equal(torch.cat([a.train, a.val]), tokens)
    assert not set(a.train.tolist()) & set(a.val.tolist())


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.6, 1.0])
def test_split_rejects_bad_fraction(bad):
    with pytest.raises(ValueError, match="val_fraction"):
        split_tokens(torch.arange(100), bad)


# --- micro-batches ----------------------------------------------------------

def test_micro_batches_deterministic_across_instances():
    a = MicroBatches(_stream(), seq_len=16, micro_batch_size=4, seed=3)
    b = MicroBatches(_stream(), seq_len=16, micro_batch_size=4, seed=3)
    for i in [0, 1, 7, 500]:
        xa, ya = a.micro_batch(i)
        xb, yb = b.micro_batch(i)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_micro_batches_random_access_order_independent():
    forward = MicroBatches(_stream(), 16, 4, seed=1)
    backward = MicroBatches(_stream(), 16, 4, seed=1)
    indices = list(range(0, 400, 13))  # spans several epochs (77 steps each)
    fwd = {i: forward.micro_batch(i)[0] for i in indices}
    bwd = {i: backward.micro_batch(i)[0] for i in reversed(indices)}
    assert all(torch.equal(fwd[i], bwd[i]) for i in indices)
    again = forward.micro_batch(indices[0])[0]
    assert torch.equal(again, fwd[indices[0]])


def test_iterator_matches_micro_batch():
    mb = MicroBatches(_stream(), 16, 2, seed=0)
    it = mb.iterator(start_index=10)
    for i in range(10, 14):
        x, y = next(it)
        ex, ey = mb.micro_batch(i)
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_labels_are_shifted_inputs_and_shapes():
    mb = MicroBatches(_stream(), seq_len=16, micro_batch_size=4, seed=0)
    x, y = mb.micro_batch(5)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y[:, -1], (x[:, -1] + 1) % 256)
    assert torch.all((x[:, 0] % 16) == 0)  # window starts on the non-overlapping grid


def test_epoch_covers_windows_without_repeats():
    tokens = torch.arange(16 * 40 + 1)  # exactly 40 windows, values unique
    mb = MicroBatches(tokens, seq_len=16, micro_batch_size=4, seed=2)
    starts = [int(s) for i in range(10) for s in mb.micro_batch(i)[0][:, 0]]
    assert sorted(starts) == [16 * k for k in range(40)]
    next_epoch = [int(s) for i in range(10, 20) for s in mb.micro_batch(i)[0][:, 0]]
    assert next_epoch != starts  # reshuffled per epoch


def test_different_seeds_differ():
    tokens = torch.arange(16 * 200 + 1)
    a = MicroBatches(tokens, 16, 4, seed=0)
    b = MicroBatches(tokens, 16, 4, seed=1)
    assert any(not torch.equal(a.micro_batch(i)[0], b.micro_batch(i)[0]) for i in range(3))


def test_dp_ranks_get_disjoint_samples():
    tokens = torch.arange(16 * 200 + 1)
    ranks = [MicroBatches(tokens, 16, 4, seed=0, dp_rank=r, dp_size=3) for r in range(3)]
    for index in [0, 1, 15, 16, 40]:  # 16 steps per epoch: crosses an epoch boundary
        seen = [_window_set(r.micro_batch(index)) for r in ranks]
        assert all(len(s) == 4 for s in seen)
        assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


def test_micro_batches_reject_bad_arguments():
    with pytest.raises(ValueError, match="too short"):
        MicroBatches(torch.arange(60), seq_len=16, micro_batch_size=4)
    with pytest.raises(ValueError, match="too short"):
        MicroBatches(torch.arange(16 * 4 + 1), seq_len=16, micro_batch_size=4, dp_size=2)
    MicroBatches(torch.arange(16 * 4 + 1), seq_len=16, micro_batch_size=4)  # exactly enough
    with pytest.raises(ValueError, match="dp_rank"):
        MicroBatches(_stream(), 16, 4, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError):
        MicroBatches(_stream(), 16, 4).micro_batch(-1)


# --- validation ---------------------------------------------------------

def test_validation_batches_fixed_and_contiguous():
    tokens = torch.arange(16 * 30 + 1)
    a = validation_batches(tokens, seq_len=16, micro_batch_size=4, max_batches=3)
    b = validation_batches(tokens, seq_len=16, micro_batch_size=4, max_batches=3)
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(ya[:, :-1], xa[:, 1:])
    starts = [int(s) for x, _ in a for s in x[:, 0]]
    assert starts == [16 * k for k in range(12)]
    assert len(validation_batches(tokens, 16, 4, max_batches=100)) == 7  # capped by data
    with pytest.raises(ValueError, match="validation"):
        validation_batches(torch.arange(20), 16, 4, max_batches=2)


# --- bundle ---------------------------------------------------------------

def test_build_data_default_is_fast_and_complete():
    start = time.perf_counter()
    bundle = build_data(None, seq_len=64, micro_batch_size=4, seed=0, max_val_batches=5)
    assert time.perf_counter() - start < 1.0
    assert isinstance(bundle, DataBundle) and bundle.source == "shakespeare"
    assert isinstance(bundle.tokenizer, ByteTokenizer)
    assert bundle.num_train_tokens > 5_000_000
    assert abs(bundle.num_val_tokens / (bundle.num_train_tokens + bundle.num_val_tokens) - 0.05) < 0.001
    assert len(bundle.val) == 5
    x, y = bundle.train.micro_batch(0)
    assert x.shape == (4, 64) and torch.equal(y[:, :-1], x[:, 1:])


def test_build_data_from_text_file_and_directory(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text(TEXT, encoding="utf-8")
    bundle = build_data(str(f), seq_len=8, micro_batch_size=2, val_fraction=0.25, dp_rank=1, dp_size=2)
    assert bundle.source == str(f)
    assert bundle.num_train_tokens + bundle.num_val_tokens == len(TEXT)
    x, _ = bundle.train.micro_batch(0)
    assert bundle.tokenizer.decode(x[0]) in TEXT
    d = tmp_path / "d"
    d.mkdir()
    (d / "x.txt").write_text(TEXT, encoding="utf-8")
    assert build_data(str(d), 8, 2).num_train_tokens > 0
