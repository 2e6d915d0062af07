"""Llama, Mistral and Qwen2 cut into pipeline layers: embed_tokens | decoder layer x N | norm + lm_head.

The three share one layout (``model.embed_tokens``, ``model.layers.{i}``, ``model.norm``, ``lm_head``)
and differ only in their HF classes, so one set of layers serves them, given the family's classes.
Each block wraps the HF decoder layer itself and computes its rotary cos/sin from positions 0..T-1
(transformers 5.x takes them from the model's rotary module, which a stage does not have).
Attention is sdpa without a mask (causal), or with an explicit causal sliding-window mask when the
layer slides and the sequence is longer than its window.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ds_checkfree.models.hf.layer import HFLayer


@dataclass(frozen=True)
class Family:
    """The HF classes of one Llama-family architecture."""

    decoder_layer: type
    rotary: type
    rms_norm: type


def family(model_type: str) -> Family:
    """Import the HF classes of ``model_type`` (llama, mistral or qwen2) when first needed."""
    if model_type == "llama":
        from transformers.models.llama import modeling_llama as m
        return Family(m.LlamaDecoderLayer, m.LlamaRotaryEmbedding, m.LlamaRMSNorm)
    if model_type == "mistral":
        from transformers.models.mistral import modeling_mistral as m
        return Family(m.MistralDecoderLayer, m.MistralRotaryEmbedding, m.MistralRMSNorm)
    if model_type == "qwen2":
        from transformers.models.qwen2 import modeling_qwen2 as m
        return Family(m.Qwen2DecoderLayer, m.Qwen2RotaryEmbedding, m.Qwen2RMSNorm)
    raise ValueError(f"not a Llama-family model_type: {model_type!r}")


def sliding_window_of(config, layer_idx: int) -> int | None:
    """The window of layer ``layer_idx``, or None when it attends to the whole prefix
    (Mistral: every layer slides when ``sliding_window`` is set; Qwen2: the layers its
    ``layer_types`` mark ``sliding_attention``; Llama: none)."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[layer_idx] != "sliding_attention":
        return None
    return int(window)


def causal_window_mask(seq_len: int, window: int, device) -> torch.Tensor:
    """Boolean [1, 1, T, T]: query q sees keys k with q - window < k <= q (HF's sliding rule)."""
    q = torch.arange(seq_len, device=device).unsqueeze(1)
    k = torch.arange(seq_len, device=device).unsqueeze(0)
    return ((k <= q) & (k > q - window)).unsqueeze(0).unsqueeze(0)


class LlamaFamilyEmbedding(HFLayer):
    """First layer: token ids [B, T] -> hidden states (``model.embed_tokens``)."""

    def __init__(self, config, weights_dir=None, dtype: torch.dtype = torch.float32):
        super().__init__(weights_dir, dtype)
        with self.weights_context():
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.hf_prefixes = {"embed_tokens.": "model.embed_tokens."}
        self.load_weights()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class LlamaFamilyBlock(HFLayer):
    """Decoder layer ``index`` (``model.layers.{index}``): the HF class itself, self-contained."""

    def __init__(self, config, index: int, weights_dir=None, dtype: torch.dtype = torch.float32):
        super().__init__(weights_dir, dtype)
        classes = family(config.model_type)
        self.index = index
        self.window = sliding_window_of(config, index)
        with self.weights_context():
            self.layer = classes.decoder_layer(config, index)
        self.rotary_emb = classes.rotary(config=config)  # non-persistent buffers only: not on meta
        self.hf_prefixes = {"layer.": f"model.layers.{index}."}
        self.load_weights()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        seq_len = hidden.shape[1]
        position_ids = torch.arange(seq_len, device=hidden.device).unsqueeze(0)
        cos, sin = self.rotary_emb(hidden, position_ids)
        mask = None
        if self.window is not None and seq_len > self.window:
            mask = causal_window_mask(seq_len, self.window, hidden.device)
        out = self.layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=(cos, sin))
        return out[0] if isinstance(out, tuple) else out


class LlamaFamilyTail(HFLayer):
    """Last layer: ``model.norm`` + ``lm_head`` -> logits.

    A checkpoint with tied embeddings (``tie_word_embeddings``, e.g. small Qwen2 models) stores no
    ``lm_head.weight``: this layer then starts from its own copy of ``model.embed_tokens.weight``
    and trains it separately (untied in the pipeline); export writes it as ``lm_head.weight`` with
    ``tie_word_embeddings=False`` so that transformers reloads exactly what was trained.
    """

    def __init__(self, config, weights_dir=None, dtype: torch.dtype = torch.float32, tied: bool = False):
        super().__init__(weights_dir, dtype)
        classes = family(config.model_type)
        with self.weights_context():
            self.norm = classes.rms_norm(config.hidden_size, eps=config.rms_norm_eps)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.hf_prefixes = {"norm.": "model.norm.", "lm_head.": "lm_head."}
        if tied:
            self.hf_sources = {"lm_head.weight": "model.embed_tokens.weight"}
        self.load_weights()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))
