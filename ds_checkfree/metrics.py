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


def read_metrics(path: str) -> list[dict]:
    """Load a metrics.jsonl (a directory or the file itself)."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
