"""Hugging Face decoder models (Llama, Mistral, Qwen2, GPT-2) into and out of a CheckFree pipeline.

``load_hf_parts(dir)`` turns a ``save_pretrained`` directory into head / blocks / tail ``LayerSpec``
lists for ``CheckFreePipelineModule`` (each layer reads only its own tensors when built);
``export_hf(engine_or_layers, src_dir, out_dir)`` writes the trained layers back as a directory
that ``AutoModelForCausalLM.from_pretrained`` loads.
"""
from ds_checkfree.models.hf.checkpoint import HFModelError
from ds_checkfree.models.hf.export import export_hf
from ds_checkfree.models.hf.parts import SUPPORTED, HFParts, build_sequential, load_hf_parts

__all__ = ["HFModelError", "HFParts", "SUPPORTED", "build_sequential", "export_hf", "load_hf_parts"]
