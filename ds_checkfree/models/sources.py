"""Where a run's model comes from: a built-in preset, a Hugging Face directory, or the user's parts.

Every source answers the same few questions before any process group exists (its name, how
many blocks it has, its sequence length and vocabulary when it knows them, its tokenizer) and
gives its ``PipelineParts`` to every engine build, the first and each one after a recovery.
"""
from __future__ import annotations

from ds_checkfree.config.checkfree import ConfigError
from ds_checkfree.pipe.parts import PipelineParts, check_parts

HF_PREFIX = "hf:"


class UserModel:
    """The user's own ``PipelineParts`` (``ds_checkfree.initialize(model=parts)``)."""

    tokenizer = None

    def __init__(self, parts: PipelineParts):
        check_parts(parts)
        self._parts = parts
        self.name = parts.name
        self.max_seq_len = parts.info.get("max_seq_len")
        self.vocab_size = parts.info.get("vocab_size")

    @property
    def num_blocks(self) -> int:
        return self._parts.num_blocks

    def parts(self, base_seed: int = 1234) -> PipelineParts:
        """The same parts for every build: the specs hold no state, each build makes new layers."""
        return self._parts

    def num_parameters(self):
        return self._parts.info.get("num_parameters")

    def to_dict(self) -> dict:
        return {"name": self.name, "source": "user", "num_blocks": self.num_blocks,
                "head": [_type_name(s) for s in self._parts.head], "block": _type_name(self._parts.blocks[0]),
                "tail": [_type_name(s) for s in self._parts.tail], **self._parts.info}


def _type_name(spec) -> str:
    t = getattr(spec, "typename", type(spec))
    return getattr(t, "__name__", str(t))


def resolve_model(model, overrides: dict | None = None):
    """A model source from what a user passes: a preset name or model YAML path (the built-in
    LLaMA), ``hf:DIR`` (a local Hugging Face directory), a ``ModelConfig``, ``PipelineParts``,
    or a source object already resolved. Every way it can be wrong is a ``ConfigError``."""
    from ds_checkfree.models.llama import ModelConfig
    if isinstance(model, PipelineParts):
        if overrides:
            raise ConfigError(f"model overrides {sorted(overrides)} apply to the built-in presets only. "
                              "Fix: change your own layers instead.")
        return UserModel(model)
    if isinstance(model, ModelConfig) or hasattr(model, "parts") and hasattr(model, "num_blocks"):
        return model
    if isinstance(model, str) and model.startswith(HF_PREFIX):
        from ds_checkfree.models.hf_source import HFModel
        return HFModel(model[len(HF_PREFIX):], overrides)
    if isinstance(model, str):
        return _preset(model, overrides)
    raise ConfigError(f"model = {model!r}: expected a preset name, a model YAML path, 'hf:DIR', a ModelConfig or "
                      "ds_checkfree.PipelineParts. Fix: pass one of those.")


def _preset(model: str, overrides: dict | None):
    import yaml

    from ds_checkfree.models.llama import load_model_config
    try:
        return load_model_config(model, **(overrides or {}))
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1} column {where.column + 1}" if where is not None else ""
        raise ConfigError(f"--model = {model!r}: malformed YAML{at} ({getattr(err, 'problem', None) or err}). "
                          "Fix: correct the file's YAML syntax.") from None
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"--model = {model!r}: {err}. Fix: pass a preset name, the path of a model YAML, or "
                          "hf:DIR for a local Hugging Face model.") from None
