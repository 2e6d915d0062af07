"""GPT-2 cut into pipeline layers: wte + wpe | GPT2Block x N | ln_f + lm_head.

GPT-2 ties its LM head to ``wte``. Across pipeline stages a tie would need the first and last stage
to exchange gradients every step, so the pipeline unties it: the tail starts from its own copy of
``transformer.wte.weight`` and the two train separately. Export writes the head as
``lm_head.weight`` with ``tie_word_embeddings=False``, so transformers reloads exactly the weights
the pipeline trained.
"""
from __future__ import annotations

import torch
from torch import nn

from ds_checkfree.models.hf.layer import HFLayer


class GPT2Embedding(HFLayer):
    """First layer: token ids [B, T] -> ``wte(ids) + wpe(0..T-1)``, then GPT-2's embedding dropout."""

    def __init__(self, config, weights_dir=None, dtype: torch.dtype = torch.float32):
        super().__init__(weights_dir, dtype)
        self.max_positions = config.n_positions
        with self.weights_context():
            self.wte = nn.Embedding(config.vocab_size, config.n_embd)
            self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.hf_prefixes = {"wte.": "transformer.wte.", "wpe.": "transformer.wpe."}
        self.load_weights()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[-1]
        if seq_len > self.max_positions:
            raise ValueError(f"sequence length {seq_len} exceeds GPT-2's n_positions={self.max_positions}; "
                             f"shorten the data's seq_len")
        positions = torch.arange(seq_len, device=input_ids.device).unsqueeze(0)
        return self.drop(self.wte(input_ids) + self.wpe(positions))


class GPT2BlockPipe(HFLayer):
    """Block ``index`` (``transformer.h.{index}``): HF's GPT2Block itself, causal through sdpa."""

    def __init__(self, config, index: int, weights_dir=None, dtype: torch.dtype = torch.float32):
        super().__init__(weights_dir, dtype)
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block

        self.index = index
        with self.weights_context():
            self.layer = GPT2Block(config, layer_idx=index)
        self.hf_prefixes = {"layer.": f"transformer.h.{index}."}
        self.load_weights()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.layer(hidden)
        return out[0] if isinstance(out, tuple) else out


class GPT2Tail(HFLayer):
    """Last layer: ``transformer.ln_f`` + an untied ``lm_head`` (see the module docstring)."""

    def __init__(self, config, weights_dir=None, dtype: torch.dtype = torch.float32, tied: bool = True):
        super().__init__(weights_dir, dtype)
        with self.weights_context():
            self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.hf_prefixes = {"ln_f.": "transformer.ln_f.", "lm_head.": "lm_head."}
        if tied:
            self.hf_sources = {"lm_head.weight": "transformer.wte.weight"}
        self.load_weights()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(hidden))
