"""Model definitions: LLaMA as a flat list of pipeline layers."""

from ds_checkfree.models.llama import (
    PRESET_DIR,
    DecoderLayerPipe,
    EmbeddingPipe,
    ModelConfig,
    NormHeadPipe,
    build_sequential,
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
    "build_sequential",
    "init_weights_",
    "list_presets",
    "lm_loss",
    "load_into_hf",
    "load_model_config",
]
