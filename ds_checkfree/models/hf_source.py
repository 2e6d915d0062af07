"""A local Hugging Face directory as a run's model source (``--model hf:DIR``).

It answers what every source answers before any process group exists (``models.sources``): its
name, number of blocks, sequence limit, vocabulary, tokenizer, and its ``PipelineParts`` for each
engine build. The directory is checked once, here; the layers read their tensors when built.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ds_checkfree.models.hf.checkpoint import HFModelError
from ds_checkfree.models.hf.parts import HFParts, load_hf_parts


def _position_limit(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    return None


class HFModel:
    """``hf:DIR``: a Llama / Mistral / Qwen2 / GPT-2 directory written by ``save_pretrained``.

    ``tokenizer`` is the spec ``build_data(..., tokenizer=...)`` takes: ``"hf:DIR"`` when the
    directory has a tokenizer (checked against the model's vocabulary), else None (bytes).
    ``overrides``: only ``max_seq_len`` (to cap the sequence length below the model's position
    limit); the model's shape is its checkpoint's.
    """

    def __init__(self, hf_dir: str | Path, overrides: dict | None = None, dtype: torch.dtype = torch.float32):
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        max_seq_len = overrides.pop("max_seq_len", None)
        if overrides:
            raise HFModelError(f"model overrides {sorted(overrides)} do not apply to hf:{hf_dir} (its shape is its "
                               f"checkpoint's); only max_seq_len can be set. Fix: drop them")
        self.hf: HFParts = load_hf_parts(hf_dir, dtype=dtype)
        config = self.hf.config
        self.hf_dir = self.hf.hf_dir
        self.name = f"hf:{self.hf_dir.name}"
        self.architecture = self.hf.architecture
        self.vocab_size = int(config.vocab_size)
        limit = _position_limit(config)
        if max_seq_len is not None and limit is not None and max_seq_len > limit:
            raise HFModelError(f"max_seq_len = {max_seq_len} exceeds hf:{hf_dir}'s position limit {limit}. "
                               f"Fix: use at most {limit}")
        self.max_seq_len = max_seq_len or limit
        self.tokenizer = f"hf:{self.hf_dir}" if self.hf.tokenizer is not None else None
        self._num_parameters = None

    @property
    def num_blocks(self) -> int:
        return len(self.hf.blocks)

    def parts(self, base_seed: int = 1234):
        """The same specs for every build (the first and each after a recovery); ``base_seed`` is
        unused: the weights come from the checkpoint."""
        from ds_checkfree.pipe.parts import PipelineParts

        return PipelineParts(head=self.hf.head, blocks=self.hf.blocks, tail=self.hf.tail, loss_fn=self.hf.loss_fn,
                             name=self.name, init_std=float(getattr(self.hf.config, "initializer_range", 0.02)),
                             info={"max_seq_len": self.max_seq_len, "vocab_size": self.vocab_size,
                                   "num_parameters": self.num_parameters()})

    def num_parameters(self) -> int:
        """Parameters of the pipeline's model (LM head untied), counted on the meta device."""
        if self._num_parameters is None:
            from ds_checkfree.models.hf.parts import build_sequential

            with torch.device("meta"):
                self._num_parameters = sum(p.numel() for p in build_sequential(self.hf).parameters())
        return self._num_parameters

    def to_dict(self) -> dict:
        return {"name": self.name, "source": "hf", "dir": str(self.hf_dir), "architecture": self.architecture,
                "num_blocks": self.num_blocks, "vocab_size": self.vocab_size, "max_seq_len": self.max_seq_len,
                "hidden_size": int(getattr(self.hf.config, "hidden_size", 0) or 0),
                "tokenizer": self.tokenizer or "byte", "num_parameters": self.num_parameters()}
