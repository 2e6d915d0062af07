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
