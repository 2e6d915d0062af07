"""Shared helpers: launching real multi-process jobs from tests (through ds_checkfree.testing)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ds_checkfree.testing import BIN, events_of, job_env, launcher_cmd, read_metrics, steps_accounted, steps_of
from ds_checkfree.testing import REPO as ROOT

__all__ = ["BIN", "ROOT", "events_of", "job_env", "launch_cmd", "read_metrics", "run_job", "steps_accounted",
           "steps_of", "write_config"]


def launch_cmd(launcher: str, nproc: int, script: str, args: list[str]) -> list[str]:
    """``script`` (relative to the checkout) and its arguments under ``launcher`` with ``nproc`` ranks."""
    return [*launcher_cmd(launcher, nproc), str(ROOT / script), *args]


def run_job(launcher: str, nproc: int, script: str, args: list[str], timeout: int = 300, check: bool = True,
            log_path: Path | None = None) -> subprocess.CompletedProcess:
    """Run a real multi-process job; on failure the assertion shows the log tail."""
    proc = subprocess.run(launch_cmd(launcher, nproc, script, args), cwd=ROOT, env=job_env(), timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if log_path is not None:
        log_path.write_text(proc.stdout)
    if check and proc.returncode != 0:
        pytest.fail(f"job failed (rc={proc.returncode}):\n{proc.stdout[-6000:]}")
    return proc


def write_config(path: Path, base: str = "checkfree.json", **checkfree) -> Path:
    """A copy of a shipped DeepSpeed config with the checkfree section updated."""
    cfg = json.loads((ROOT / "ds_configs" / base).read_text())
    ds_keys = {k: checkfree.pop(k) for k in list(checkfree) if k.startswith("ds_")}
    cfg["checkfree"].update(checkfree)
    for k, v in ds_keys.items():
        cfg[k[3:]] = v
    path.write_text(json.dumps(cfg))
    return path
