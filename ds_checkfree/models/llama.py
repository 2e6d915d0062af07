"""LLaMA split into pipeline layers (embedding | decoder x N | norm+head).

CheckFree recovers a lost stage from its neighbours' *decoder* weights, so the
model must be a flat list of independent layers that DeepSpeed's
PipelineModule can partition.  Each decoder layer owns its rotary embedding
(non-persistent buffers only) and recomputes cos/sin from positions 0..T-1,
so a stage never needs anything from another stage except the hidden states.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from ds_checkfree.pipe.parts import PipelineParts, SeededLayerSpec

PRESET_DIR = Path(__file__).resolve().parent / "presets"

_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "max_seq_len",
)
_FLOAT_FIELDS = ("rope_theta", "rms_norm_eps", "init_std")


@dataclass(kw_only=True)
class ModelConfig:
    """Shape of a LLaMA model; the single source of truth for every stage."""

    name: str
    vocab_size: int = 256  # byte-level tokenizer
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None  # None -> num_heads (plain multi-head attention)
    max_seq_len: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"model config: 'name' must be a non-empty string, got {self.name!r}")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        for key in _INT_FIELDS:
            val = getattr(self, key)
            # bool is an int subclass; `num_layers: true` in YAML is a mistake, not 1.
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(
                    f"model config '{self.name}': '{key}' must be a positive integer, got {val!r}; "
                    f"set e.g. {key}: 64"
                )
        for key in _FLOAT_FIELDS:
            val = getattr(self, key)
            # PyYAML reads `1e-5` (no dot) as a string, so accept numeric strings.
            if isinstance(val, str):
                try:
                    val = float(val)
                except ValueError:
                    val = None
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val) or val <= 0:
                raise ValueError(
                    f"model config '{self.name}': '{key}' must be a positive number, "
                    f"got {getattr(self, key)!r}; write it e.g. as 1.0e-5"
                )
            setattr(self, key, float(val))
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model config '{self.name}': hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}; pick num_heads that divides hidden_size"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model config '{self.name}': num_heads={self.num_heads} is not divisible by "
                f"num_kv_heads={self.num_kv_heads}; pick num_kv_heads that divides num_heads "
                f"(or omit it for plain multi-head attention)"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"model config '{self.name}': head_dim = hidden_size/num_heads = {self.head_dim} "
                f"is odd, but rotary embeddings need an even head_dim; change hidden_size or num_heads"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_llama_config(self) -> LlamaConfig:
        """HF config for the same shape. sdpa is required: with eager attention
        and no mask (we pass none) HF's attention is NOT causal."""
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.max_seq_len,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            initializer_range=self.init_std,
            attention_dropout=0.0,
            attention_bias=False,
            mlp_bias=False,
            hidden_act="silu",
            tie_word_embeddings=False,
            use_cache=False,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
            attn_implementation="sdpa",
        )

    def num_parameters(self) -> int:
        """Analytic parameter count (no weight tying), to size runs without building."""
        d, v, i = self.hidden_size, self.vocab_size, self.intermediate_size
        kv = self.num_kv_heads * self.head_dim
        attn = d * d + 2 * d * kv + d * d  # q, k, v, o (no biases)
        mlp = 3 * d * i  # gate, up, down
        per_layer = attn + mlp + 2 * d  # + two RMSNorm weights
        return v * d + self.num_layers * per_layer + d + d * v

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def num_blocks(self) -> int:
        """The repeated blocks (decoder layers) a pipeline splits over its stages."""
        return self.num_layers

    def parts(self, base_seed: int = 1234):
        """This model as ``PipelineParts`` (``llama_parts``)."""
        return llama_parts(self, base_seed)


_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
_REQUIRED = tuple(
    f.name
    for f in dataclasses.fields(ModelConfig)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
)


def list_presets() -> list[str]:
    """Names of the shipped presets (files in models/presets/)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _looks_like_path(s: str) -> bool:
    return s.endswith((".yaml", ".yml")) or "/" in s or "\\" in s


def load_model_config(name_or_path: str, **overrides: Any) -> ModelConfig:
    """Load a preset by name or a user YAML by path; overrides (None ignored)
    win over the file and are validated together with it."""
    name_or_path = str(name_or_path)
    if _looks_like_path(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"model config file not found: {name_or_path}")
    else:
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ValueError(
                f"unknown model preset {name_or_path!r}; available presets: {', '.join(list_presets())} "
                f"(or pass a path to a .yaml file)"
            )
    with open(path) as fh:
        data = yaml.safe_load(fh)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"model config {path}: top level must be a mapping of keys, got {type(data).__name__}")
    data = dict(data)
    data.setdefault("name", path.stem)

    for key, val in overrides.items():
        if val is not None:
            data[key] = val

    unknown = sorted(str(k) for k in data if k not in _FIELDS)
    if unknown:
        raise ValueError(
            f"model config {path}: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"valid keys: {', '.join(_FIELDS)}"
        )
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ValueError(f"model config {path}: missing required key(s) {', '.join(missing)}")
    return ModelConfig(**data)


def init_weights_(module: nn.Module, std: float) -> nn.Module:
    """What HF's PreTrainedModel._init_weights would do; standalone layers must
    do it themselves so that a given torch seed gives the same weights."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, std)
                if m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
            elif isinstance(m, LlamaRMSNorm):
                m.weight.fill_(1.0)
    return module


class EmbeddingPipe(nn.Module):
    """First pipeline layer: token ids -> hidden states."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.max_seq_len = cfg.max_seq_len
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        init_weights_(self, cfg.init_std)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] > self.max_seq_len:
            raise ValueError(
                f"sequence length {input_ids.shape[-1]} exceeds max_seq_len={self.max_seq_len}; "
                f"raise max_seq_len in the model config or shorten the data's seq_len"
            )
        return self.embed_tokens(input_ids)


#: repr(ModelConfig) -> the HF config its decoder layers are built with (read only): building
#: one validates every field (~20 ms on a busy core), once per layer and per rebuild otherwise
_LAYER_CONFIGS: dict[str, LlamaConfig] = {}


def _layer_config(cfg: ModelConfig) -> LlamaConfig:
    key = repr(cfg)
    if key not in _LAYER_CONFIGS:
        _LAYER_CONFIGS[key] = cfg.to_llama_config()
    return _LAYER_CONFIGS[key]


class DecoderLayerPipe(nn.Module):
    """One LlamaDecoderLayer, causal without a mask; rotary cos/sin are
    recomputed from positions every call so the stage is self-contained."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        hf_cfg = _layer_config(cfg)
        if hf_cfg._attn_implementation != "sdpa":
            # Without a mask only sdpa (is_causal) keeps attention causal.
            raise RuntimeError(f"DecoderLayerPipe needs sdpa attention, got {hf_cfg._attn_implementation!r}")
        self.layer_idx = layer_idx
        self.layer = LlamaDecoderLayer(hf_cfg, layer_idx)
        self.rotary_emb = LlamaRotaryEmbedding(hf_cfg)
        init_weights_(self, cfg.init_std)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        seq_len = hidden.shape[1]
        position_ids = torch.arange(seq_len, device=hidden.device).unsqueeze(0)
        cos, sin = self.rotary_emb(hidden, position_ids)
        out = self.layer(
            hidden,
            attention_mask=None,
            position_ids=position_ids,
            position_embeddings=(cos, sin),
        )
        # transformers 5.x returns a tensor; 4.x returned a 1-tuple.
        if isinstance(out, tuple):
            out = out[0]
        return out


class NormHeadPipe(nn.Module):
    """Last pipeline layer: final RMSNorm + untied LM head -> logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        init_weights_(self, cfg.init_std)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy; labels are already shifted by the data
    pipeline. Module-level so DeepSpeed can call loss_fn(outputs, labels)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1).long(),
        ignore_index=-100,
    )


def layer_seed(base_seed: int, part: str, index: int, num_layers: int) -> int:
    """Seed of one layer: a function of the layer, not of the stage it lands on, so any stage
    can be rebuilt bit-identically by a single-process reference (``build_reference``)."""
    offset = {"head": 0, "block": index + 1, "tail": num_layers + 1}[part]
    return base_seed * 10007 + offset


def llama_parts(cfg: ModelConfig, base_seed: int = 1234):
    """The built-in LLaMA as a user of the generic API: embedding | decoder x N | norm + head,
    each layer built under its own seed."""
    n = cfg.num_layers
    return PipelineParts(
        head=[SeededLayerSpec(layer_seed(base_seed, "head", 0, n), EmbeddingPipe, cfg)],
        blocks=[SeededLayerSpec(layer_seed(base_seed, "block", i, n), DecoderLayerPipe, cfg, i) for i in range(n)],
        tail=[SeededLayerSpec(layer_seed(base_seed, "tail", 0, n), NormHeadPipe, cfg)],
        loss_fn=lm_loss, name=cfg.name, init_std=cfg.init_std,
        info={"max_seq_len": cfg.max_seq_len, "vocab_size": cfg.vocab_size, "num_parameters": cfg.num_parameters()})


def build_reference(cfg: ModelConfig, base_seed: int) -> nn.Sequential:
    """Single-process model with exactly the weights the pipeline builds (equivalence tests)."""
    parts = llama_parts(cfg, base_seed)
    return nn.Sequential(*[spec.build() for spec in parts.head + parts.blocks + parts.tail])


def build_sequential(cfg: ModelConfig) -> nn.Sequential:
    """Single-process reference with exactly the layer list the pipeline uses."""
    return nn.Sequential(
        EmbeddingPipe(cfg),
        *[DecoderLayerPipe(cfg, i) for i in range(cfg.num_layers)],
        NormHeadPipe(cfg),
    )


def load_into_hf(seq: nn.Sequential, cfg: ModelConfig) -> LlamaForCausalLM:
    """Copy the sequential's weights into a stock LlamaForCausalLM, to prove
    the pipeline layers compute exactly the HF model."""
    expected = cfg.num_layers + 2
    if len(seq) != expected:
        raise ValueError(f"expected {expected} layers (embedding + {cfg.num_layers} decoders + head), got {len(seq)}")
    model = LlamaForCausalLM(cfg.to_llama_config())
    state = {"model.embed_tokens.weight": seq[0].embed_tokens.weight}
    for i in range(cfg.num_layers):
        for key, val in seq[1 + i].layer.state_dict().items():
            state[f"model.layers.{i}.{key}"] = val
    state["model.norm.weight"] = seq[-1].norm.weight
    state["lm_head.weight"] = seq[-1].lm_head.weight
    model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return model.to(seq[0].embed_tokens.weight.device).eval()
