"""Tiny random Hugging Face decoder models saved locally, for tests that need a real checkpoint.

Nothing downloads: each builder makes a model from a config with a fixed seed, writes it with
``save_pretrained`` (config.json + model.safetensors) and, on request, a word-level tokenizer trained
offline on a few sentences. Import them from any test (pytest puts tests/ on the path): ``from hf_fixtures import make_hf_dir``;
from a worker script started with the repository on PYTHONPATH: ``from tests.hf_fixtures import ...``.
"""
from __future__ import annotations

from pathlib import Path

import torch

ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt2")

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a stage that dies is rebuilt from its neighbours",
    "pipelines pass hidden states from one stage to the next",
    "to be or not to be that is the question",
    "all the world is a stage and all the men and women merely players",
]


def _llama_like(cls_name: str, vocab_size: int, hidden: int, layers: int, **extra):
    import transformers

    cfg_cls = getattr(transformers, f"{cls_name}Config")
    base = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    base.update(extra)
    return cfg_cls(**base), getattr(transformers, f"{cls_name}ForCausalLM")


def tiny_config(arch: str, vocab_size: int = 200, hidden: int = 32, layers: int = 4, **extra):
    """(config, model class) of a tiny model of ``arch``; ``extra`` overrides config fields."""
    import transformers

    if arch == "llama":
        return _llama_like("Llama", vocab_size, hidden, layers, **extra)
    if arch == "mistral":
        extra.setdefault("sliding_window", 6)  # shorter than the tests' sequences: the window is exercised
        return _llama_like("Mistral", vocab_size, hidden, layers, **extra)
    if arch == "qwen2":
        # Qwen2 ties embeddings by default in its small sizes, and may slide its upper layers.
        extra.setdefault("tie_word_embeddings", True)
        extra.setdefault("use_sliding_window", True)
        extra.setdefault("sliding_window", 5)
        extra.setdefault("max_window_layers", 2)
        return _llama_like("Qwen2", vocab_size, hidden, layers, **extra)
    if arch == "gpt2":
        base = dict(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64,
                    bos_token_id=None, eos_token_id=None)
        base.update(extra)
        return transformers.GPT2Config(**base), transformers.GPT2LMHeadModel
    raise ValueError(f"unknown tiny architecture {arch!r}; pick one of {', '.join(ARCHITECTURES)}")


def build_tokenizer(extra_tokens: int = 0):
    """A PreTrainedTokenizerFast over a word-level vocabulary of SENTENCES (under 40 tokens),
    plus ``extra_tokens`` filler tokens to make it as large as a test needs."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    if extra_tokens:
        tok.add_tokens([f"filler{i}" for i in range(extra_tokens)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


def make_hf_dir(path: Path, arch: str = "llama", tokenizer: bool = True, seed: int = 0,
                tokenizer_extra: int = 0, **config_fields) -> Path:
    """Save a tiny random ``arch`` model (and a tokenizer) under ``path``; return ``path``."""
    cfg, model_cls = tiny_config(arch, **config_fields)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    path = Path(path)
    model.save_pretrained(path)
    if tokenizer:
        build_tokenizer(tokenizer_extra).save_pretrained(path)
    return path


def load_hf_model(path: Path):
    """The reference: the directory loaded by transformers itself, fp32, sdpa, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


def sample_ids(vocab_size: int, batch: int = 2, seq_len: int = 12, seed: int = 1) -> torch.Tensor:
    """Random token ids [batch, seq_len] from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=gen)
