"""Base of every pipeline layer cut from a Hugging Face model: it knows its tensors' HF names.

A layer is built by DeepSpeed from a ``LayerSpec`` on the one rank that owns it, and loads its own
tensors at construction (only its own keys, via ``safe_open``). Its HF submodules are first built on
the meta device, so a large layer never pays for a random initialisation it throws away; the
weights read from disk are then assigned in place.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from ds_checkfree.models.hf.checkpoint import HFModelError, open_checkpoint


def _under_meta_device() -> bool:
    """True while someone builds us under ``torch.device("meta")`` (to learn parameter names)."""
    return torch.empty(()).device.type == "meta"


class HFLayer(nn.Module):
    """A layer whose state maps to HF checkpoint names through module prefixes.

    Subclasses set ``hf_prefixes`` (local prefix -> HF prefix, e.g. ``{"layer.": "model.layers.3."}``),
    may set ``hf_sources`` (local name -> HF name read instead, for an untied copy of a tied
    weight), build their HF submodules inside ``self.weights_context()`` and end ``__init__`` with
    ``self.load_weights()``.
    """

    def __init__(self, weights_dir: str | Path | None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weights_dir = None if weights_dir is None else str(weights_dir)
        self.dtype = dtype
        self.hf_prefixes: dict[str, str] = {}
        self.hf_sources: dict[str, str] = {}

    def weights_context(self):
        """Meta device while building submodules whose weights will be read from disk."""
        loading = self.weights_dir is not None and not _under_meta_device()
        return torch.device("meta") if loading else contextlib.nullcontext()

    def hf_name(self, local: str) -> str:
        for local_prefix, hf_prefix in self.hf_prefixes.items():
            if local.startswith(local_prefix):
                return hf_prefix + local[len(local_prefix):]
        raise KeyError(f"{type(self).__name__}: no HF name for {local!r}")

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """{original HF name: tensor} of this layer's persistent state (what export writes)."""
        return {self.hf_name(k): v.detach() for k, v in self.state_dict().items()}

    def load_weights(self) -> None:
        """Read this layer's tensors from ``weights_dir`` (cast to ``dtype``) and assign them."""
        if self.weights_dir is None or _under_meta_device():
            if self.weights_dir is None:
                self.to(self.dtype)
            return
        expected = {k: v for k, v in self.state_dict().items()}
        sources = {local: self.hf_sources.get(local, self.hf_name(local)) for local in expected}
        tensors = open_checkpoint(self.weights_dir).read(sorted(set(sources.values())))
        state = {}
        for local, source in sources.items():
            tensor = tensors[source]
            if tuple(tensor.shape) != tuple(expected[local].shape):
                raise HFModelError(
                    f"hf:{self.weights_dir}: tensor {source!r} has shape {tuple(tensor.shape)} but config.json "
                    f"implies {tuple(expected[local].shape)}; the config and the weights disagree")
            state[local] = tensor.to(self.dtype).contiguous()
        self.load_state_dict(state, strict=True, assign=True)
        left = [name for name, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"{type(self).__name__}: {left} not loaded (non-persistent state built on meta)")
