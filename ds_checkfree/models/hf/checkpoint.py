"""A Hugging Face directory on disk: what it must contain, and reading single tensors from it.

Everything here runs before any process group exists, so a bad directory fails in one line that
names the fix. Tensors are read one name at a time with ``safetensors.safe_open``: a pipeline rank
reads only the layers it builds, never the whole checkpoint.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from ds_checkfree.config.checkfree import ConfigError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_TORCH_BIN = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class HFModelError(ConfigError):
    """A Hugging Face directory the pipeline cannot use; the message names the fix."""


def check_directory(hf_dir: str | Path) -> Path:
    """The directory itself, config.json and safetensors weights must be there."""
    path = Path(hf_dir)
    if not path.is_dir():
        raise HFModelError(f"hf:{hf_dir}: directory not found; pass a directory written by save_pretrained")
    if not (path / "config.json").is_file():
        raise HFModelError(f"hf:{hf_dir}: no config.json; pass a directory written by save_pretrained")
    weights_files(path)
    return path


def read_config_json(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise HFModelError(f"hf:{path}: config.json is not valid JSON ({exc}); rewrite it with save_pretrained") from None


def weights_files(path: Path) -> list[Path]:
    """The safetensors files of ``path`` (one file, or the shards its index names)."""
    if (path / INDEX_FILE).is_file():
        index = json.loads((path / INDEX_FILE).read_text())
        files = sorted({path / name for name in index.get("weight_map", {}).values()})
        missing = [f.name for f in files if not f.is_file()]
        if not files or missing:
            raise HFModelError(f"hf:{path}: {INDEX_FILE} names missing shard(s) {missing or '(none listed)'}; "
                               f"copy every shard or save the model again with save_pretrained")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    if any((path / name).is_file() for name in _TORCH_BIN):
        raise HFModelError(f"hf:{path}: only PyTorch .bin weights, no safetensors; convert with "
                           f"AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR)")
    raise HFModelError(f"hf:{path}: no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}); "
                       f"save the model with save_pretrained(DIR)")


class Checkpoint:
    """Names -> files of one directory's safetensors weights; reads only the tensors asked for."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        self.file_of: dict[str, Path] = {}
        for file in weights_files(path):
            with safe_open(str(file), framework="pt") as fh:
                for key in fh.keys():
                    self.file_of[key] = file

    def resolve(self, name: str) -> str:
        """``name`` as stored: checkpoints of the base model lack its prefix (GPT-2's hub files
        store ``wte.weight``, not ``transformer.wte.weight``)."""
        if name in self.file_of:
            return name
        stripped = name.split(".", 1)[-1]
        if stripped != name and stripped in self.file_of:
            return stripped
        raise HFModelError(f"hf:{self.path}: the weights have no tensor {name!r}; the directory does not hold "
                           f"the model its config.json describes, save it again with save_pretrained")

    def has(self, name: str) -> bool:
        try:
            self.resolve(name)
        except HFModelError:
            return False
        return True

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """{name: tensor} for ``names``, each file opened once."""
        from safetensors import safe_open

        stored = {name: self.resolve(name) for name in names}
        by_file: dict[Path, list[str]] = {}
        for name, key in stored.items():
            by_file.setdefault(self.file_of[key], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, group in by_file.items():
            with safe_open(str(file), framework="pt") as fh:
                for name in group:
                    out[name] = fh.get_tensor(stored[name])
        return out


@functools.lru_cache(maxsize=8)
def _open_cached(path: str, stamp: tuple) -> Checkpoint:
    return Checkpoint(Path(path))


def open_checkpoint(hf_dir: str | Path) -> Checkpoint:
    """One parsed header per directory and process (the layers of a stage share it); a rewritten
    directory (new modification times) is parsed again."""
    path = Path(hf_dir).resolve()
    stamp = tuple((f.name, f.stat().st_mtime_ns) for f in weights_files(path))
    return _open_cached(str(path), stamp)
