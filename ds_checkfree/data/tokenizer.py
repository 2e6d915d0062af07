"""Byte-level tokenizer: no vocabulary download, works offline on any text."""

from __future__ import annotations

import numpy as np
import torch


class ByteTokenizer:
    """Maps UTF-8 bytes 1:1 to token ids, so every string is representable."""

    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        """Return a 1-D int64 tensor of the UTF-8 bytes of ``text`` (vectorised, no Python loop)."""
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return torch.from_numpy(raw.astype(np.int64))

    def decode(self, ids) -> str:
        """Invert ``encode``; invalid UTF-8 (e.g. a cut multi-byte char) becomes U+FFFD, not an error."""
        if isinstance(ids, torch.Tensor):
            arr = ids.detach().cpu().reshape(-1).numpy()
        else:
            arr = np.asarray(ids).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}); got range [{arr.min()}, {arr.max()}]")
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# Files any of which means a directory carries its own tokenizer (AutoTokenizer reads them).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
_CHUNK_CHARS = 1 << 20


def load_hf_tokenizer(hf_dir):
    """``AutoTokenizer.from_pretrained(hf_dir)`` (offline) when the directory has tokenizer files, else None."""
    from pathlib import Path

    path = Path(hf_dir)
    if not any((path / name).is_file() for name in HF_TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _line_chunks(text: str, size: int) -> list[str]:
    """Cut ``text`` after a line end roughly every ``size`` characters (a whole line may be longer)."""
    chunks, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        chunks.append(text[start:end])
        start = end
    return chunks


class HFTokenizer:
    """A Hugging Face tokenizer behind ByteTokenizer's interface (``vocab_size``, ``encode``, ``decode``),
    so the data pipeline tokenizes a corpus with the model's own vocabulary.

    ``encode`` adds no special tokens and cuts long corpora after a line end about every million
    characters (tokenizers are fed bounded pieces); only the tokens at such a cut can differ from
    tokenizing the whole text at once."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)

    @classmethod
    def from_dir(cls, hf_dir) -> "HFTokenizer":
        tok = load_hf_tokenizer(hf_dir)
        if tok is None:
            raise FileNotFoundError(f"{hf_dir}: no tokenizer files ({', '.join(HF_TOKENIZER_FILES)}); "
                                    f"save one there with tokenizer.save_pretrained(DIR)")
        return cls(tok)

    def encode(self, text: str) -> torch.Tensor:
        """1-D int64 token ids of ``text``."""
        if not text:
            return torch.zeros(0, dtype=torch.int64)
        pieces = self.tokenizer(_line_chunks(text, _CHUNK_CHARS), add_special_tokens=False, verbose=False)
        return torch.from_numpy(np.concatenate([np.asarray(ids, dtype=np.int64) for ids in pieces["input_ids"]]))

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().reshape(-1).tolist()
        return self.tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)


def make_tokenizer(spec: str | None = None):
    """The tokenizer of a run: ``None``/``"byte"`` -> ByteTokenizer; a HF directory (``hf:DIR`` or
    ``DIR``) -> its own tokenizer through HFTokenizer."""
    if spec is None or spec == "byte":
        return ByteTokenizer()
    return HFTokenizer.from_dir(spec[3:] if spec.startswith("hf:") else spec)
