"""Data pipeline: offline corpora, byte or Hugging Face tokenizer, and replayable micro-batches."""

from ds_checkfree.data.batches import DataBundle, MicroBatches, Splits, build_data, split_tokens, validation_batches
from ds_checkfree.data.corpus import DEFAULT_CORPUS, load_corpus
from ds_checkfree.data.tokenizer import ByteTokenizer, HFTokenizer, make_tokenizer

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "make_tokenizer",
    "load_corpus",
    "DEFAULT_CORPUS",
    "split_tokens",
    "Splits",
    "MicroBatches",
    "validation_batches",
    "DataBundle",
    "build_data",
]
