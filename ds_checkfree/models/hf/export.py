"""Write pipeline layers back as a Hugging Face directory that ``AutoModelForCausalLM`` loads.

Each stage writes the tensors of the layers it owns under their original HF names, one safetensors
shard per writing rank; rank 0 then writes ``model.safetensors.index.json`` (which names every
shard), ``config.json`` and the source's other files (generation config, tokenizer). In one
process the whole model is one ``model.safetensors``. The LM head is always written as its own
``lm_head.weight`` and the config says ``tie_word_embeddings=false``: the pipeline trains it untied.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from ds_checkfree.models.hf.checkpoint import INDEX_FILE, SINGLE_FILE, HFModelError, check_directory

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".index.json")


def hf_layers(model) -> list[nn.Module]:
    """The HF-named layers in ``model``: an engine (its ``.module``), a module with ``owned_layers()``
    (this rank's layers, CheckFree+ replicas excluded), an nn.Sequential, or a list of modules or of
    ``(part, index, module)`` tuples."""
    model = getattr(model, "module", model)
    if hasattr(model, "owned_layers"):
        items = [m for _, _, m in model.owned_layers()]
    elif isinstance(model, (list, tuple, nn.Sequential)):
        items = [m[-1] if isinstance(m, tuple) else m for m in model]
    else:
        raise TypeError(f"export_hf: cannot find layers in {type(model).__name__}; pass an engine, a "
                        f"CheckFreePipelineModule, an nn.Sequential or a list of layers")
    return [m for m in items if hasattr(m, "hf_state_dict")]


def collect_state(layers: list[nn.Module]) -> dict[str, torch.Tensor]:
    """{HF name: contiguous CPU tensor} of ``layers``; a name written twice is a bug, not a merge."""
    state: dict[str, torch.Tensor] = {}
    for layer in layers:
        for name, tensor in layer.hf_state_dict().items():
            if name in state:
                raise ValueError(f"export_hf: tensor {name!r} comes from two layers; pass each layer once")
            state[name] = tensor.detach().to("cpu").contiguous()
    return state


def _clear_old_weights(out: Path) -> None:
    for old in [out / SINGLE_FILE, out / INDEX_FILE, *out.glob("model-*.safetensors")]:
        old.unlink(missing_ok=True)


def write_metadata(src: Path, out: Path, dtype: torch.dtype | None) -> None:
    """config.json (head untied, dtype of the written tensors) and every other non-weight file of ``src``."""
    for file in sorted(src.iterdir()):
        if file.is_file() and file.name != "config.json" and not file.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(file, out / file.name)
    config = json.loads((src / "config.json").read_text())
    config["tie_word_embeddings"] = False
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _check_complete(src: Path, names: set[str]) -> None:
    """Every tensor the model needs is written: its head, its tail, and all its blocks."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src)
    config.tie_word_embeddings = False
    with torch.device("meta"):
        expected = set(AutoModelForCausalLM.from_config(config).state_dict())
    missing = sorted(expected - names)
    if missing:
        raise HFModelError(f"export_hf: {len(missing)} tensor(s) missing, e.g. {missing[:3]}; pass all the "
                           f"model's layers (one process) or call export_hf on every pipeline rank")


def _save(state: dict[str, torch.Tensor], file: Path) -> None:
    from safetensors.torch import save_file

    save_file(state, str(file), metadata={"format": "pt"})


def export_hf(model, src_hf_dir: str | Path, out_dir: str | Path, *, group=None) -> Path:
    """Write ``model``'s layers as a HF directory at ``out_dir``; the other files come from ``src_hf_dir``.

    One process (``model`` holds every layer, or torch.distributed is not initialised): one
    ``model.safetensors``. Several pipeline ranks (``model`` is an engine or a pipeline module
    and torch.distributed is up): call it on every rank of ``group`` (default: the world);
    the first data-parallel replica of each stage writes ``model-rank{R}.safetensors``, rank 0
    writes the index and the metadata; every rank returns once the directory is complete.
    Old weights in ``out_dir`` are removed first.
    """
    src = check_directory(src_hf_dir)
    out = Path(out_dir)
    module = getattr(model, "module", model)
    distributed = hasattr(module, "owned_layers") and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size(group) > 1
    if not distributed:
        state = collect_state(hf_layers(model))
        _check_complete(src, set(state))
        out.mkdir(parents=True, exist_ok=True)
        _clear_old_weights(out)
        _save(state, out / SINGLE_FILE)
        write_metadata(src, out, _dtype_of(state))
        return out
    return _export_distributed(module, src, out, group)


def _dtype_of(state: dict[str, torch.Tensor]) -> torch.dtype | None:
    dtypes = {t.dtype for t in state.values()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _writes_shard(module) -> bool:
    """One copy per stage: the first data-parallel replica writes it (``module``: a pipeline
    module, whose grid is a private member: ``ds_private.MEMBERS``)."""
    return module._grid.get_data_parallel_rank() == 0


def _export_distributed(module, src: Path, out: Path, group) -> Path:
    dist = torch.distributed
    rank = dist.get_rank(group)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _clear_old_weights(out)
    dist.barrier(group)
    state = collect_state(hf_layers(module)) if _writes_shard(module) else {}
    shard = f"model-rank{dist.get_rank():05d}.safetensors"
    if state:
        out.mkdir(parents=True, exist_ok=True)
        _save(state, out / shard)
    summary = {"shard": shard, "names": sorted(state), "bytes": sum(t.numel() * t.element_size() for t in state.values()),
               "dtypes": sorted({str(t.dtype) for t in state.values()})}
    summaries: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(summaries, summary, group=group)  # also the barrier: every shard is on disk
    error = None
    if rank == 0:
        try:
            _write_index(src, out, summaries)
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it, not only rank 0
            error = f"{type(exc).__name__}: {exc}"
    verdict = [error]
    dist.broadcast_object_list(verdict, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    if verdict[0] is not None:
        raise HFModelError(f"export_hf failed on rank 0: {verdict[0]}")
    return out


def _write_index(src: Path, out: Path, summaries: list[dict]) -> None:
    weight_map: dict[str, str] = {}
    for summary in summaries:
        for name in summary["names"]:
            if name in weight_map:
                raise HFModelError(f"export_hf: tensor {name!r} written by two ranks ({weight_map[name]}, "
                                   f"{summary['shard']}); each layer must have one owner")
            weight_map[name] = summary["shard"]
    _check_complete(src, set(weight_map))
    index = {"metadata": {"total_size": sum(s["bytes"] for s in summaries)}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    dtypes = {d for s in summaries for d in s["dtypes"]}
    write_metadata(src, out, getattr(torch, dtypes.pop().removeprefix("torch.")) if len(dtypes) == 1 else None)
