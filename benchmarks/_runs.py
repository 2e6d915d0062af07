"""Shared helper for the benchmarks: launch one ``launch/train.py`` run and read its metrics.

``run_train(config, output_dir, ...)`` writes ``config`` (a full DeepSpeed JSON dict with a
``checkfree`` section) to ``output_dir/ds_config.json``, runs
``deepspeed --num_gpus N --master_port <free port> launch/train.py ...`` with
``DS_ACCELERATOR=cpu OMP_NUM_THREADS=1`` (``accelerator="cuda"``: the N ranks share GPU 0,
``torchrun --standalone --no-python scripts/one_gpu_rank.sh python launch/train.py ...``
with ``DS_ACCELERATOR=cuda``), captures the log to ``output_dir/train.log``,
raises ``RunFailed`` (with the log tail) on a non-zero exit, and returns the parsed
``metrics.jsonl`` records.

Launchers, metrics records and recovery phases come from ``ds_checkfree.testing`` (the harness
the tests share); this module holds what only the benchmarks need.

``stop_when(records) -> bool`` (optional) is polled on the records written so far every
``poll_s`` seconds; when it returns True the run is ended (its own process group only) and
counts as finished: ``run_train`` returns the records, and ``last_run_stopped_early()`` says so.
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import time

from ds_checkfree.testing import REPO, TRAIN, job_env, launcher_cmd, read_metrics
from ds_checkfree.testing.procs import kill_group

ROOT = str(REPO)
RESULTS = os.path.join(ROOT, "benchmarks", "results")


class RunFailed(RuntimeError):
    pass


def base_config(mode: str = "checkfree", **checkfree) -> dict:
    """``ds_configs/checkfree.json`` with the checkfree section's mode and extra keys replaced."""
    with open(os.path.join(ROOT, "ds_configs", "checkfree.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg = copy.deepcopy(cfg)
    cfg["checkfree"]["mode"] = mode
    cfg["checkfree"].update(checkfree)
    return cfg


_STOPPED_EARLY = [False]


def last_run_stopped_early() -> bool:
    """Whether the last ``run_train`` was ended by its ``stop_when`` condition."""
    return _STOPPED_EARLY[0]


def launch_cmd(num_ranks: int, accelerator: str = "cpu") -> list[str]:
    """The launcher prefix for ``num_ranks`` ranks of ``launch/train.py`` (then its arguments):
    DeepSpeed's launcher on CPU, torchrun with every rank on GPU 0 on CUDA."""
    if accelerator not in ("cpu", "cuda"):
        raise ValueError(f"accelerator {accelerator!r}: choose cpu or cuda")
    return launcher_cmd("deepspeed" if accelerator == "cpu" else "torchrun", num_ranks,
                        accelerator=accelerator) + [str(TRAIN)]


def add_failure_run_args(p, *, steps: int, fail_step: int) -> None:
    """The options of a benchmark that loses a stage once: model, length, which step and stage."""
    p.add_argument("--model", default="tiny")
    p.add_argument("--num_layers", type=int, default=None)
    p.add_argument("--seq_len", type=int, default=None)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--fail_step", type=int, default=fail_step)
    p.add_argument("--fail_stage", type=int, default=1)


def mean_sd(values, digits: int = 3) -> str:
    """``mean ± sd`` of the finite values (one value alone; ``n/a`` for none)."""
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    m = statistics.mean(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def run_train(config: dict, output_dir: str, *, steps: int, model: str = "tiny", num_gpus: int = 4,
              extra_args: list[str] | tuple = (), timeout_s: float | None = None, quiet: bool = False,
              stop_when=None, poll_s: float = 0.5, accelerator: str = "cpu") -> list[dict]:
    os.makedirs(output_dir, exist_ok=True)
    cfg_path = os.path.join(output_dir, "ds_config.json")
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    metrics_path = os.path.join(output_dir, "metrics.jsonl")
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    cmd = launch_cmd(num_gpus, accelerator) + ["--deepspeed_config", cfg_path, "--model", model, "--steps",
                                               str(steps), "--output_dir", output_dir, *map(str, extra_args)]
    env = job_env(accelerator)
    log_path = os.path.join(output_dir, "train.log")
    t0 = time.time()
    if not quiet:
        print(f"  run: {' '.join(cmd[1:])}", flush=True)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        _STOPPED_EARLY[0] = False
        deadline = None if timeout_s is None else t0 + timeout_s
        rc = None
        while rc is None:
            wait = poll_s if stop_when is not None else None
            if deadline is not None:
                wait = max(0.0, deadline - time.time()) if wait is None else min(wait, max(0.0, deadline - time.time()))
            try:
                rc = proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                if deadline is not None and time.time() >= deadline:
                    kill_group(proc, grace_s=15)
                    rc = "timeout"
                elif stop_when is not None and stop_when(read_metrics(metrics_path, missing_ok=True)):
                    kill_group(proc, grace_s=15)  # our own launcher's process group only
                    _STOPPED_EARLY[0] = True
                    rc = 0
    if rc != 0 or not os.path.exists(metrics_path):
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = "".join(f.readlines()[-40:])
        raise RunFailed(f"run failed (rc={rc}) after {time.time() - t0:.0f} s: {' '.join(cmd)}\n"
                        f"log: {log_path}\n--- log tail ---\n{tail}")
    if not quiet:
        print(f"  done in {time.time() - t0:.0f} s -> {output_dir}", flush=True)
    return read_metrics(output_dir)
