"""Deterministic, random-access batches so a recovered pipeline can redo any step exactly."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ds_checkfree.data.corpus import DEFAULT_CORPUS, load_corpus
from ds_checkfree.data.tokenizer import ByteTokenizer, HFTokenizer, make_tokenizer

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Splits:
    """Train/validation token streams; the split is positional so it never changes between runs."""

    train: torch.Tensor
    val: torch.Tensor


def split_tokens(tokens: torch.Tensor, val_fraction: float = 0.05) -> Splits:
    """Hold out the last ``val_fraction`` of the stream: fixed, disjoint, no RNG involved."""
    if not 0.0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    n = int(tokens.numel())
    n_val = max(1, int(n * val_fraction))
    if n_val >= n:
        raise ValueError(f"cannot split {n} tokens into train and validation; use a larger corpus")
    return Splits(train=tokens[: n - n_val], val=tokens[n - n_val:])


def _window_starts(num_tokens: int, seq_len: int) -> int:
    """Number of non-overlapping input windows (each needs seq_len + 1 tokens, stride seq_len)."""
    return max(0, (num_tokens - 1) // seq_len)


def _gather(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> Batch:
    """Cut windows of seq_len + 1 tokens at ``starts``; labels are inputs shifted by one."""
    idx = starts.reshape(-1, 1) + torch.arange(seq_len + 1).reshape(1, -1)
    windows = tokens[idx].long()
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def _check_sizes(seq_len: int, micro_batch_size: int) -> None:
    if seq_len < 1 or micro_batch_size < 1:
        raise ValueError(f"seq_len and micro_batch_size must be >= 1, got {seq_len} and {micro_batch_size}")


class MicroBatches:
    """Micro-batch ``i`` is a pure function of (seed, i, dp_rank, dp_size).

    Each global step takes ``dp_size * micro_batch_size`` distinct windows from a per-epoch
    permutation; rank r takes slice r, so ranks never share a window within a step.
    Leftover windows at an epoch end are skipped (they reappear under the next shuffle).
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, micro_batch_size: int,
                 seed: int = 0, dp_rank: int = 0, dp_size: int = 1):
        _check_sizes(seq_len, micro_batch_size)
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        self.tokens = tokens.reshape(-1)
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.num_windows = _window_starts(self.tokens.numel(), seq_len)
        per_step = micro_batch_size * dp_size
        if self.num_windows < per_step:
            needed = per_step * seq_len + 1
            raise ValueError(
                f"corpus too short: {self.tokens.numel()} tokens, but one step of {dp_size} rank(s) x "
                f"{micro_batch_size} x {seq_len} tokens needs at least {needed}; "
                "use a larger corpus or smaller seq_len/micro_batch_size"
            )
        self.steps_per_epoch = self.num_windows // per_step
        self._perm_cache: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        """Window order for ``epoch``; seeded by (seed, epoch) so it is reproducible anywhere."""
        perm = self._perm_cache.get(epoch)
        if perm is None:
            rng = np.random.default_rng([self.seed, epoch])
            perm = torch.from_numpy(rng.permutation(self.num_windows).astype(np.int64))
            if len(self._perm_cache) >= 2:
                self._perm_cache.pop(next(iter(self._perm_cache)))
            self._perm_cache[epoch] = perm
        return perm

    def micro_batch(self, index: int) -> Batch:
        """Return ``(input_ids, labels)`` of shape [B, T] for step ``index`` on this rank."""
        if index < 0:
            raise ValueError(f"micro-batch index must be >= 0, got {index}")
        epoch, step = divmod(index, self.steps_per_epoch)
        b = self.micro_batch_size
        offset = (step * self.dp_size + self.dp_rank) * b
        window_ids = self._permutation(epoch)[offset: offset + b]
        return _gather(self.tokens, window_ids * self.seq_len, self.seq_len)

    def iterator(self, start_index: int = 0):
        """Endless stream from ``start_index``; resuming after recovery just passes the step."""
        index = start_index
        while True:
            yield self.micro_batch(index)
            index += 1

    def __iter__(self):
        return self.iterator(0)


def validation_batches(tokens: torch.Tensor, seq_len: int, micro_batch_size: int,
                       max_batches: int) -> list[Batch]:
    """Consecutive windows from the start of the val stream, so val loss is comparable across runs."""
    _check_sizes(seq_len, micro_batch_size)
    tokens = tokens.reshape(-1)
    count = min(max_batches, _window_starts(tokens.numel(), seq_len) // micro_batch_size)
    if count < 1:
        raise ValueError(
            f"validation split too short: {tokens.numel()} tokens cannot fill one batch of "
            f"{micro_batch_size} x {seq_len}; raise val_fraction or use a larger corpus"
        )
    starts = torch.arange(count * micro_batch_size) * seq_len
    return [_gather(tokens, chunk, seq_len) for chunk in starts.split(micro_batch_size)]


@dataclass
class DataBundle:
    """Everything the engine needs from the data side, built once per run."""

    tokenizer: ByteTokenizer | HFTokenizer
    train: MicroBatches
    val: list[Batch]
    num_train_tokens: int
    num_val_tokens: int
    source: str


@functools.lru_cache(maxsize=4)
def build_data(source: str | None, seq_len: int, micro_batch_size: int, seed: int = 0,
               val_fraction: float = 0.05, dp_rank: int = 0, dp_size: int = 1,
               max_val_batches: int = 8, tokenizer: str | None = None) -> DataBundle:
    """Load, tokenize, split and wrap a corpus into train/val batches.

    Memoised per process: the bundle is read-only (batches are drawn by index), and a spare
    process builds its data while it waits, not after it took a lost stage's place.
    ``tokenizer``: None for bytes (the presets' default), or a HF directory (``hf:DIR``) whose
    tokenizer to use (see ``make_tokenizer``)."""
    tok = make_tokenizer(tokenizer)
    tokens = tok.encode(load_corpus(source))
    splits = split_tokens(tokens, val_fraction)
    train = MicroBatches(splits.train, seq_len, micro_batch_size, seed=seed, dp_rank=dp_rank, dp_size=dp_size)
    val = validation_batches(splits.val, seq_len, micro_batch_size, max_val_batches)
    return DataBundle(
        tokenizer=tok,
        train=train,
        val=val,
        num_train_tokens=int(splits.train.numel()),
        num_val_tokens=int(splits.val.numel()),
        source=source or DEFAULT_CORPUS,
    )
