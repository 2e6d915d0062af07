"""Shared helpers: launching real multi-process jobs from tests."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(**extra) -> dict:
    env = dict(os.environ)
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def launch_cmd(launcher: str, nproc: int, script: str, args: list[str]) -> list[str]:
    script = str(ROOT / script)
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), script, *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port()), "--master_addr", "127.0.0.1", script, *args]
    if launcher == "mpirun":
        return [str(BIN / "mpirun"), "--oversubscribe", "--map-by", "slot", "--bind-to", "none", "-n", str(nproc),
                "-x", "OMP_NUM_THREADS", "-x", "DS_ACCELERATOR", "-x", "PYTHONPATH", "-x", "PYTHONUNBUFFERED",
                sys.executable, script, *args]
    raise ValueError(launcher)


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


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def steps_of(records: list[dict]) -> list[dict]:
    return [r for r in records if "loss" in r and "event" not in r]


def events_of(records: list[dict], name: str) -> list[dict]:
    return [r for r in records if r.get("event") == name]


def steps_accounted(records: list[dict]) -> list[int]:
    """Steps with a metrics row, plus those the writer said were completed on the other stages
    while its own step broke (a peer died during the step's final loss exchange: the job goes
    on after them and their rows are lost, ``steps_completed_elsewhere``)."""
    done = {r["step"] for r in steps_of(records)}
    done.update(s for e in events_of(records, "steps_completed_elsewhere") for s in e["steps"])
    return sorted(done)
