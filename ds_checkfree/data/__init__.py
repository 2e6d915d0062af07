"""Data pipeline: offline corpora, byte tokenizer, and replayable micro-batches."""

from ds_checkfree.data.batches import DataBundle, MicroBatches, Splits, build_data, split_tokens, validation_batches
from ds_checkfree.data.corpus import DEFAULT_CORPUS, load_corpus
from ds_checkfree.data.tokenizer import ByteTokenizer

__all__ = [
    "ByteTokenizer",
    "load_corpus",
    "DEFAULT_CORPUS",
    "split_tokens",
    "Splits",
    "MicroBatches",
    "validation_batches",
    "DataBundle",
    "build_data",
]
