"""metrics.jsonl and run.json: the contract that benchmarks and tests read.

One JSON object per line, flushed as it goes, so a crashed or killed run still leaves
everything up to its last step on disk.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null rather than produce an unreadable file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsWriter:
    """Appends records to ``DIR/metrics.jsonl``; a disabled writer (other ranks) does nothing."""

    def __init__(self, output_dir: str | None, enabled: bool = True, append: bool = False):
        self.enabled = bool(output_dir) and enabled
        self.path = os.path.join(output_dir, "metrics.jsonl") if output_dir else None
        self._file = None
        if self.enabled:
            os.makedirs(output_dir, exist_ok=True)
            self._file = open(self.path, "a" if append else "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(_clean(record)) + "\n")
        self._file.flush()

    def step(self, step: int, loss: float, lr: float, step_time_s: float, tokens_per_s: float,
             grad_norms: list[float], **extra) -> None:
        self.write({"step": step, "loss": loss, "lr": lr, "step_time_s": step_time_s,
                    "tokens_per_s": tokens_per_s, "grad_norms": list(grad_norms), "time": time.time(), **extra})

    def validation(self, step: int, val_loss: float) -> None:
        self.write({"step": step, "val_loss": val_loss, "time": time.time()})

    def event(self, name: str, step: int, stage: int | None, **details) -> None:
        self.write({"event": name, "step": step, "stage": stage, "time": time.time(), **details})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_run_json(output_dir: str, info: dict) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "run.json"), "w", encoding="utf-8") as f:
        json.dump(_clean(info), f, indent=2, sort_keys=True, default=str)


def read_metrics(path: str | os.PathLike, *, missing_ok: bool = False) -> list[dict]:
    """The records of a metrics.jsonl (``path``: the file or the run directory holding it).

    One rule for a half-written line: the writer appends each record as one whole line and
    flushes it, so only the LAST line can be incomplete (read while being written, or cut by a
    kill). An unterminated last line that does not parse is left out: the next read sees it
    whole. Any other line that does not parse means the file is damaged, not in progress:
    ``ValueError`` naming the file and line. ``missing_ok``: no file yet (a run still starting)
    reads as no records instead of raising ``FileNotFoundError``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    try:
        with open(path, encoding="utf-8") as f:
            return parse_metrics_lines(f, path)
    except FileNotFoundError:
        if missing_ok:
            return []
        raise


def parse_metrics_lines(lines, source: str = "metrics.jsonl") -> list[dict]:
    """``read_metrics``' rule applied to lines as read from a file (each keeps its newline)."""
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if line.endswith("\n"):
                raise ValueError(f"{source}:{number}: not a JSON record ({err.msg}); the file is damaged") from None
    return records
