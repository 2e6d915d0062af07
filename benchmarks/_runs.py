"""Shared helper for the benchmarks: launch one ``launch/train.py`` run and read its metrics.

``run_train(config, output_dir, ...)`` writes ``config`` (a full DeepSpeed JSON dict with a
``checkfree`` section) to ``output_dir/ds_config.json``, runs
``deepspeed --num_gpus N --master_port <free port> launch/train.py ...`` with
``DS_ACCELERATOR=cpu OMP_NUM_THREADS=1`` (``accelerator="cuda"``: the N ranks share GPU 0,
``torchrun --standalone --no-python scripts/one_gpu_rank.sh python launch/train.py ...``
with ``DS_ACCELERATOR=cuda``), captures the log to ``output_dir/train.log``,
raises ``RunFailed`` (with the log tail) on a non-zero exit, and returns the parsed
``metrics.jsonl`` records.

``stop_when(records) -> bool`` (optional) is polled on the records written so far every
``poll_s`` seconds; when it returns True the run is ended (its own process group only) and
counts as finished: ``run_train`` returns the records, and ``last_run_stopped_early()`` says so.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deepspeed_cmd() -> list[str]:
    local = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    if os.path.exists(local):
        return [local]
    found = shutil.which("deepspeed")
    return [found] if found else [sys.executable, "-m", "deepspeed.launcher.runner"]


def parse_metrics_lines(lines) -> list[dict]:
    """Records of a metrics.jsonl; a torn last line (a run ended while writing) is skipped."""
    out = []
    for line in lines:
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if line.endswith("\n"):
                raise
    return out


def read_metrics(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return parse_metrics_lines(f)


_STOPPED_EARLY = [False]


def last_run_stopped_early() -> bool:
    """Whether the last ``run_train`` was ended by its ``stop_when`` condition."""
    return _STOPPED_EARLY[0]


def _stop(proc) -> None:
    os.killpg(proc.pid, signal.SIGTERM)  # our own launcher's process group only
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def launch_cmd(num_ranks: int, accelerator: str = "cpu") -> list[str]:
    """The launcher prefix for ``num_ranks`` ranks of ``launch/train.py`` (then its arguments)."""
    train = os.path.join(ROOT, "launch", "train.py")
    if accelerator == "cpu":
        return _deepspeed_cmd() + ["--num_gpus", str(num_ranks), "--master_port", str(free_port()), train]
    if accelerator == "cuda":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_ranks),
                "--no-python", os.path.join(ROOT, "scripts", "one_gpu_rank.sh"), sys.executable, train]
    raise ValueError(f"accelerator {accelerator!r}: choose cpu or cuda")


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
    env = dict(os.environ, DS_ACCELERATOR=accelerator, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
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
                    _stop(proc)
                    rc = "timeout"
                elif stop_when is not None and os.path.exists(metrics_path):
                    with open(metrics_path, encoding="utf-8") as f:
                        if stop_when(parse_metrics_lines(f)):
                            _stop(proc)
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


def split(records: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(step records, validation records, events), each in file order."""
    steps = [r for r in records if "event" not in r and "loss" in r]
    vals = [r for r in records if "event" not in r and "val_loss" in r]
    events = [r for r in records if "event" in r]
    return steps, vals, events


def recovery_phases(records: list[dict], killed_at: float, backend: str = "gloo") -> list[tuple[str, float]]:
    """Where the time from a real kill (or a SIGTERM answered by a hand-off) to the next
    completed step went, from the survivors' first ``recovery`` and ``recovery_timeline``
    events (``killed_at``: when the signal was sent)."""
    rec = next(r for r in records if r.get("event") == "recovery")
    line = next(r for r in records if r.get("event") == "recovery_timeline")
    if rec["method"] == "handoff":  # a SIGTERM (``killed_at``) answered by a hand-off (ds_checkfree.elastic.preemption)
        return [("the preempted stage finishes its step (SIGTERM -> step done)", rec["step_done_at"] - killed_at),
                ("hand-off published, process gone -> error seen by the last stage",
                 rec["failed_at"] - rec["step_done_at"]),
                *_rebuild_phases(rec, line, backend, "re-materialisation (load the hand-off)"),
                ("total: SIGTERM -> next completed step", line["next_step_done_at"] - killed_at)]
    return [("detection (kill -> error seen by the last stage)", rec["failed_at"] - killed_at),
            *_rebuild_phases(rec, line, backend, "re-materialisation (CheckFree)"),
            ("total: kill -> next completed step", line["next_step_done_at"] - killed_at)]


def _rebuild_phases(rec, line, backend, remat) -> list[tuple[str, float]]:
    """The survivors' side, the same for a death and a hand-off."""
    nan = float("nan")
    leave = "close sockets" if backend == "gloo" else "abort + forget groups"
    return [(f"snapshot + {leave}", rec["revoked_at"] - rec["failed_at"]),
            ("  of which the in-memory snapshot", rec.get("snapshot_s", nan)),
            (f"  of which engine release + {backend} teardown", rec.get("close_s", nan)),
            ("agreement (coordinator round -> plan)", rec["agreed_at"] - rec["revoked_at"]),
            (f"data plane (new {backend} group)", rec["data_plane_s"]),
            ("engine rebuild (in-memory state)", rec["engine_rebuild_s"]),
            ("  of which module + its process groups", rec.get("rebuild_module_s", nan)),
            ("  of which DeepSpeed engine (config, optimizer)", rec.get("rebuild_engine_s", nan)),
            ("  of which loading the kept state", rec.get("rebuild_state_load_s", nan)),
            (remat, rec["rematerialise_s"]),
            ("redo the interrupted step", line["next_step_done_at"] - rec["rematerialised_at"])]
