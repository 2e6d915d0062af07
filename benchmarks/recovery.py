"""Recovery time: CheckFree against a DeepSpeed checkpoint reload, same model, same failure.

Every strategy loses pipeline stage 1 at the start of step K (``--fail_step``):

- ``checkfree``: mode "checkfree"; stage 1 is rebuilt from its neighbours (no checkpoints).
- ``checkpoint``: mode "off" with ``checkpoint_every`` N and ``checkpoint_dir``; DeepSpeed
  saves at step 0 and every N steps, and on the failure every rank reloads the last
  checkpoint and redoes the steps since it.
- ``checkfree_bf16``: as ``checkfree`` with DeepSpeed's ``bf16`` on (fp32 masters averaged,
  bf16 weights their cast).
- ``replica_dp2`` / ``column_dp2``: 4 stages x 2 data-parallel replicas (8 ranks); one replica
  of stage 1 lost (restored by an exact copy of its twin, method "replica") / both replicas
  lost (the whole column rebuilt by the CheckFree rule).

Everything is read from metrics.jsonl (``time`` fields are wall-clock of the last stage):

- recovery_s: the ``recovery`` event's ``seconds`` / the ``checkpoint_load`` event's ``seconds``
- fail_to_next_step_s: failure event -> the next completed step record
- steps_lost, fail_to_step_K_s: failure event -> step K completed again (redone work included)
- extra_s: fail_to_step_K_s minus the median pre-failure step time (time lost to the failure)
- bytes: CheckFree ``bytes_received`` / the size on disk of the checkpoint that was loaded
- modelled (``--bandwidth_mb_s``): the same figures with the measured load/transfer replaced
  by bytes / bandwidth (a remote store; the local disk here is far faster), plus the
  modelled cost of every checkpoint save.

    python -m benchmarks.recovery                      # tiny, ~5 min on 2 CPU cores
    python -m benchmarks.recovery --strategies checkfree checkpoint   # the two original rows
    python -m benchmarks.recovery --model 124m --num_layers 4 --seq_len 128 --steps 14 \
        --fail_step 8 --checkpoint_every 5
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import sys
import subprocess
import tempfile
import time

from benchmarks._runs import RESULTS, add_failure_run_args, base_config, mean_sd, run_train
from ds_checkfree.testing import split

#: name -> (checkfree mode, data-parallel replicas, replica lost (None: every replica), top-level config)
STRATEGIES = {
    "checkfree": ("checkfree", 1, None, {}),
    "checkpoint": ("off", 1, None, {}),
    "checkfree_bf16": ("checkfree", 1, None, {"bf16": {"enabled": True}}),
    "replica_dp2": ("checkfree", 2, 1, {}),
    "column_dp2": ("checkfree", 2, None, {}),
}


def storage_info(path: str) -> str:
    parts = []
    for cmd in (["stat", "-f", "-c", "%T", path], ["df", "-h", "--output=source,fstype,size,avail,target", path]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            parts.append(out.splitlines()[-1].split() if cmd[0] == "df" else out)
    if len(parts) == 2:
        stat_type, (src, fstype, size, avail, target) = parts
        return f"{path} on {src} mounted at {target} ({fstype}; stat -f: {stat_type}; {size}, {avail} free)"
    return f"{path} (filesystem unknown)"


def analyse(records: list[dict], strategy: str, fail_step: int, bw_mb_s: float) -> dict:
    steps, _, events = split(records)
    fail = next(e for e in events if e["event"] == "failure" and e["step"] == fail_step)
    t_fail = fail["time"]
    idx_fail = records.index(fail)
    after = [r for r in records[idx_fail:] if "event" not in r and "loss" in r]
    pre = [r["step_time_s"] for r in steps if r["step"] < fail_step and r["step"] > 2]  # skip warm-up
    step_s = statistics.median(pre) if pre else float("nan")
    next_step = after[0]
    back_at_k = next(r for r in after if r["step"] == fail_step)
    saves = [e for e in events if e["event"] == "checkpoint_save"]
    row = {"strategy": strategy, "step_s": step_s, "fail_to_next_step_s": next_step["time"] - t_fail,
           "fail_to_step_K_s": back_at_k["time"] - t_fail, "saves": len(saves),
           "save_s_mean": statistics.mean([e["seconds"] for e in saves]) if saves else 0.0,
           "save_bytes": saves[-1]["bytes"] if saves else 0}
    if strategy != "checkpoint":
        recs = [e for e in events if e["event"] == "recovery" and e["step"] == fail_step]
        how = "; ".join(f"{r['method']} from {r['sources']}" + (f" replica {r['source_replica']}"
                                                                if r.get("source_replica") is not None else "")
                        for r in recs)
        row.update(recovery_s=max(r["seconds"] for r in recs), steps_lost=0,
                   bytes=sum(r["bytes_received"] for r in recs), detail=how)
    else:
        load = next(e for e in events if e["event"] == "checkpoint_load" and e["step"] == fail_step)
        size = next((e["bytes"] for e in saves if e["step"] == load["resumed_from"]), 0)
        row.update(recovery_s=load["seconds"], steps_lost=load["steps_lost"], bytes=size,
                   detail=f"reloaded step {load['resumed_from']}")
    row["extra_s"] = row["fail_to_step_K_s"] - step_s
    bw = bw_mb_s * 1e6
    row["modelled_recovery_s"] = row["bytes"] / bw
    row["modelled_fail_to_step_K_s"] = row["fail_to_step_K_s"] - row["recovery_s"] + row["modelled_recovery_s"]
    row["modelled_save_s"] = row["save_bytes"] / bw
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_failure_run_args(p, steps=24, fail_step=16)
    p.add_argument("--checkpoint_every", type=int, default=10)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--bandwidth_mb_s", type=float, default=100.0, help="modelled remote-storage bandwidth")
    p.add_argument("--checkpoint_dir", default=None,
                   help="where the baseline saves (default: a fresh temp dir, deleted afterwards)")
    p.add_argument("--work_dir", default=None, help="run outputs (default: a temp dir, deleted afterwards)")
    p.add_argument("--csv", default=os.path.join(RESULTS, "recovery.csv"))
    p.add_argument("--timeout_s", type=float, default=900)
    p.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    p.add_argument("--accelerator", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: the ranks share GPU 0 (scripts/one_gpu_rank.sh)")
    a = p.parse_args(argv)
    if a.fail_step > a.steps:
        p.error("--fail_step must be <= --steps")

    work = a.work_dir or tempfile.mkdtemp(prefix="cf_recovery_")
    ckpt_root = a.checkpoint_dir or tempfile.mkdtemp(prefix="cf_ckpt_")
    os.makedirs(ckpt_root, exist_ok=True)
    storage = storage_info(os.path.abspath(ckpt_root))
    extra = ["--eval_every", "0"]
    if a.num_layers:
        extra += ["--num_layers", str(a.num_layers)]
    if a.seq_len:
        extra += ["--seq_len", str(a.seq_len)]
    rows, t_start = [], time.time()
    try:
        for rep in range(a.repeats):
            for strategy in a.strategies:
                mode, dp, replica, top = STRATEGIES[strategy]
                out = os.path.join(work, f"{strategy}_r{rep}")
                if strategy == "checkpoint":
                    ck = os.path.join(ckpt_root, f"r{rep}")
                    shutil.rmtree(ck, ignore_errors=True)
                    cfg = base_config("off", checkpoint_every=a.checkpoint_every, checkpoint_dir=ck)
                else:
                    cfg = base_config(mode)
                cfg.update(top)
                lost = f"{a.fail_stage}" + (f".{replica}" if replica is not None else "")
                print(f"[{strategy} repeat {rep}]", flush=True)
                recs = run_train(cfg, out, steps=a.steps, model=a.model, num_gpus=4 * dp,
                                 extra_args=extra + ["--fail_at", f"{lost}:{a.fail_step}"], timeout_s=a.timeout_s,
                                 accelerator=a.accelerator)
                row = analyse(recs, strategy, a.fail_step, a.bandwidth_mb_s)
                row["repeat"] = rep
                rows.append(row)
                if strategy == "checkpoint" and not a.checkpoint_dir:
                    shutil.rmtree(os.path.join(ckpt_root, f"r{rep}"), ignore_errors=True)
    finally:
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
        if not a.checkpoint_dir:
            shutil.rmtree(ckpt_root, ignore_errors=True)

    shape = a.model + (f", {a.num_layers} layers" if a.num_layers else "") + (f", seq {a.seq_len}" if a.seq_len else "")
    print(f"\n## Recovery after losing stage {a.fail_stage} of 4 at step {a.fail_step} ({shape}, {a.steps} steps, "
          f"{a.repeats} repeat(s), checkpoint every {a.checkpoint_every}, {a.accelerator})\n")
    print(f"Checkpoint storage (measured): {storage}")
    print(f"Modelled: bytes charged at {a.bandwidth_mb_s:g} MB/s (remote storage; for CheckFree the same rate "
          "is charged for the neighbour weights sent to the new node)\n")
    cols = [("step s (median before)", "step_s", 3), ("recovery s", "recovery_s", 4),
            ("failure -> next step s", "fail_to_next_step_s", 3),
            ("steps lost", "steps_lost", 1), ("failure -> step K again s", "fail_to_step_K_s", 3),
            ("extra s (vs 1 step)", "extra_s", 3), ("bytes moved MB", "bytes", 2),
            (f"modelled recovery s @{a.bandwidth_mb_s:g}MB/s", "modelled_recovery_s", 3),
            ("modelled failure -> step K s", "modelled_fail_to_step_K_s", 3)]
    print("| strategy | " + " | ".join(c[0] for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for s in a.strategies:
        rs = [r for r in rows if r["strategy"] == s]
        cells = [mean_sd([r[k] / (1e6 if k == "bytes" else 1) for r in rs], d) for _, k, d in cols]
        print(f"| {s} ({rs[0]['detail']}) | " + " | ".join(cells) + " |")
    ck = [r for r in rows if r["strategy"] == "checkpoint"]
    print("\ndp2 rows: 8 ranks (4 stages x 2 replicas) on the same cores as the others' 4; bytes are what the "
          "rank that logs the event received (a whole-column rebuild moves that much to each replica).")
    if ck:
        print(f"Checkpoint saves (baseline, paid even without failures): {ck[0]['saves']} per run, "
              f"{ck[0]['save_bytes'] / 1e6:.2f} MB each, measured {mean_sd([r['save_s_mean'] for r in ck])} s each "
              f"(modelled {ck[0]['modelled_save_s']:.3f} s at {a.bandwidth_mb_s:g} MB/s), i.e. "
              f"{mean_sd([r['save_s_mean'] / a.checkpoint_every for r in ck])} s/step amortised measured, "
              f"{ck[0]['modelled_save_s'] / a.checkpoint_every:.3f} s/step modelled")
    print(f"Wall time of the benchmark: {time.time() - t_start:.0f} s")

    os.makedirs(os.path.dirname(os.path.abspath(a.csv)), exist_ok=True)
    fields = ["strategy", "accelerator", "repeat", "model", "num_layers", "seq_len", "steps", "fail_step",
              "checkpoint_every",
              "step_s", "recovery_s", "fail_to_next_step_s", "steps_lost", "fail_to_step_K_s", "extra_s", "bytes",
              "bandwidth_mb_s", "modelled_recovery_s", "modelled_fail_to_step_K_s", "saves", "save_s_mean",
              "save_bytes", "modelled_save_s", "detail", "storage"]
    with open(a.csv, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "accelerator": a.accelerator, "model": a.model, "num_layers": a.num_layers,
                        "seq_len": a.seq_len, "steps": a.steps,
                        "fail_step": a.fail_step, "checkpoint_every": a.checkpoint_every,
                        "bandwidth_mb_s": a.bandwidth_mb_s, "storage": storage})
    print(f"CSV: {a.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
