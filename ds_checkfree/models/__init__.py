"""Model definitions: the built-in LLaMA (``llama``) as pipeline parts; Hugging Face models in and out (``hf``)."""

from ds_checkfree.models.llama import (
    PRESET_DIR,
    DecoderLayerPipe,
    EmbeddingPipe,
    ModelConfig,
    NormHeadPipe,
    build_reference,
    build_sequential,
    llama_parts,
    init_weights_,
    list_presets,
    lm_loss,
    load_into_hf,
    load_model_config,
)

__all__ = [
    "PRESET_DIR",
    "DecoderLayerPipe",
    "EmbeddingPipe",
    "ModelConfig",
    "NormHeadPipe",
    "build_reference",
    "build_sequential",
    "llama_parts",
    "init_weights_",
    "list_presets",
    "lm_loss",
    "load_into_hf",
    "load_model_config",
]
