"""A Hugging Face directory as the three parts of a CheckFree pipeline: head, blocks, tail.

``load_hf_parts(dir)`` checks the directory (one-line errors naming the fix, before any process
group), then describes the model as DeepSpeed ``LayerSpec`` lists. Nothing is built here: DeepSpeed
builds the specs of the local stage only, and each layer reads its own tensors when built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from deepspeed.pipe import LayerSpec
from torch import nn

from ds_checkfree.models.hf.checkpoint import HFModelError, check_directory, open_checkpoint, read_config_json
from ds_checkfree.models.llama import lm_loss

# model_type -> the CausalLM class whose checkpoints we read.
SUPPORTED = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
_SUPPORTED_TEXT = ", ".join(f"{t} ({c})" for t, c in SUPPORTED.items())


@dataclass
class HFParts:
    """A HF model in pipeline terms; ``head + blocks + tail`` is the whole model, in order."""

    head: list[LayerSpec]
    blocks: list[LayerSpec]
    tail: list[LayerSpec]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    config: Any  # the transformers PretrainedConfig, attention set to sdpa
    tokenizer: Any | None  # a transformers tokenizer, or None when the directory has none
    architecture: str  # e.g. "LlamaForCausalLM"
    hf_dir: Path = field(default=None)

    @property
    def specs(self) -> list[LayerSpec]:
        return [*self.head, *self.blocks, *self.tail]


def check_architecture(path: Path) -> tuple[str, str]:
    """(model_type, architecture name) of a supported model, else a one-line error naming them."""
    raw = read_config_json(path)
    model_type = raw.get("model_type")
    archs = raw.get("architectures") or []
    name = archs[0] if archs else str(model_type)
    if model_type not in SUPPORTED or any(a != SUPPORTED[model_type] for a in archs):
        raise HFModelError(f"hf:{path}: architecture {name!r} (model_type {model_type!r}) is not supported; "
                           f"supported: {_SUPPORTED_TEXT}")
    if model_type == "gpt2" and raw.get("add_cross_attention"):
        raise HFModelError(f"hf:{path}: GPT-2 with add_cross_attention=true (an encoder-decoder part) is not "
                           f"supported; use a decoder-only GPT-2")
    return model_type, name


def load_config(path: Path):
    """The transformers config with sdpa attention (causal without a mask, which stages rely on)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    config._attn_implementation = "sdpa"
    return config


def check_tokenizer(path: Path, tokenizer, vocab_size: int) -> None:
    if tokenizer is not None and len(tokenizer) > vocab_size:
        raise HFModelError(f"hf:{path}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                           f"{vocab_size}; resize the model (model.resize_token_embeddings({len(tokenizer)})) and "
                           f"save it again, or use the tokenizer it was trained with")


def _llama_family_specs(config, weights, dtype, tied):
    from ds_checkfree.models.hf.llama_family import LlamaFamilyBlock, LlamaFamilyEmbedding, LlamaFamilyTail

    head = [LayerSpec(LlamaFamilyEmbedding, config, weights, dtype)]
    blocks = [LayerSpec(LlamaFamilyBlock, config, i, weights, dtype) for i in range(config.num_hidden_layers)]
    tail = [LayerSpec(LlamaFamilyTail, config, weights, dtype, tied=tied)]
    return head, blocks, tail


def _gpt2_specs(config, weights, dtype, tied):
    from ds_checkfree.models.hf.gpt2 import GPT2BlockPipe, GPT2Embedding, GPT2Tail

    head = [LayerSpec(GPT2Embedding, config, weights, dtype)]
    blocks = [LayerSpec(GPT2BlockPipe, config, i, weights, dtype) for i in range(config.n_layer)]
    tail = [LayerSpec(GPT2Tail, config, weights, dtype, tied=tied)]
    return head, blocks, tail


def _head_is_tied(config, path: Path, load_weights: bool) -> bool:
    """The LM head comes from the embedding when the config ties them or the weights lack it."""
    if getattr(config, "tie_word_embeddings", False):
        return True
    return load_weights and not open_checkpoint(path).has("lm_head.weight")


def load_hf_parts(hf_dir: str | Path, *, dtype: torch.dtype = torch.float32, load_weights: bool = True,
                  tokenizer: bool = True) -> HFParts:
    """Check ``hf_dir`` and describe it as pipeline parts.

    ``dtype``: the dtype the layers load their tensors in (fp32 by default: the pipeline's master
    weights; DeepSpeed's bf16 mode casts later). ``load_weights=False`` builds layers with PyTorch's
    default initialisation instead (shapes only, not HF's init). ``tokenizer=False`` skips loading
    the directory's tokenizer (and its vocabulary check).
    """
    path = check_directory(hf_dir)
    model_type, architecture = check_architecture(path)
    config = load_config(path)
    tok = None
    if tokenizer:
        from ds_checkfree.data.tokenizer import load_hf_tokenizer

        tok = load_hf_tokenizer(path)
        check_tokenizer(path, tok, config.vocab_size)
    weights = str(path) if load_weights else None
    tied = _head_is_tied(config, path, load_weights)
    build = _gpt2_specs if model_type == "gpt2" else _llama_family_specs
    head, blocks, tail = build(config, weights, dtype, tied)
    return HFParts(head=head, blocks=blocks, tail=tail, loss_fn=lm_loss, config=config, tokenizer=tok,
                   architecture=architecture, hf_dir=path)


def build_sequential(parts: HFParts) -> nn.Sequential:
    """Every layer in one process, in pipeline order: the single-process reference of the pipeline."""
    return nn.Sequential(*[spec.build() for spec in parts.specs])
