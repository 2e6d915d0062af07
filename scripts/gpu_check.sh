#!/usr/bin/env bash
# One-GPU check of the CUDA + NCCL path (issue #10, item 5): several ranks share one GPU, each
# made to look like its own host to NCCL (NCCL_HOSTID=host$RANK, NCCL_SOCKET_IFNAME=lo,
# LOCAL_RANK=0, CUDA_VISIBLE_DEVICES=0), started by
#   torchrun --standalone --nproc_per_node N --no-python <wrapper> python launch/train.py ...
# with DS_ACCELERATOR=cuda. Runs stock DeepSpeed, CheckFree, CheckFree+, bf16, dp=2 x 3 stages,
# and the checkpoint and redundant baselines, each with logical failures, then prints one table
# (run, steps, loss first -> last, recoveries, median step time) from each run's metrics.jsonl
# and exits non-zero if any run failed, stopped early, lost a recovery or produced a non-finite loss.
# The last run, real_kill, is a real process death on NCCL: a coordinator, 4 stage processes and a
# spare started by hand (scripts/kill_check.py, no MPI needed), stage 1's process SIGKILLed after
# step 6; the survivors abort and forget the NCCL groups (ds_checkfree/data_plane.py) and go on.
# preempt: the same with SIGTERM (a preemption notice): the victim hands its stage off to the
# spare through the coordinator's store and exits 0 (ds_checkfree/preemption.py).
#
# Environment: PYTHON (default .venv/bin/python), GPU_CHECK_OUT (default out/gpu_check),
# GPU_CHECK_STEPS (default 20, >= 16), GPU_CHECK_RUN_TIMEOUT (seconds per run, default 600),
# GPU_CHECK_MODEL (default tiny; e.g. 124m), GPU_CHECK_ONLY (space-separated run names; default all),
# GPU_CHECK_SCALING (opt-in: shapes for the recovery benchmark on NCCL, e.g. "4x1,4x2"; see below).
# GPU_CHECK_CPU=1 runs the same recipe on CPU/gloo (DS_ACCELERATOR=cpu): a check of this script
# itself, which says nothing about the GPU path.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${GPU_CHECK_OUT:-out/gpu_check}
STEPS=${GPU_CHECK_STEPS:-20}
RUN_TIMEOUT=${GPU_CHECK_RUN_TIMEOUT:-600}
MODEL=${GPU_CHECK_MODEL:-tiny}

ACCEL=cuda
if [ "${GPU_CHECK_CPU:-0}" = 1 ]; then
  ACCEL=cpu
  echo "gpu_check: GPU_CHECK_CPU=1: CPU/gloo dry run of this script; it proves nothing about CUDA/NCCL"
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False for $PY): nothing to check." >&2
  echo "gpu_check: run it on a machine with an NVIDIA GPU and a CUDA build of torch; everything else is" >&2
  echo "gpu_check: covered on CPU/gloo by scripts/test.sh." >&2
  exit 2
fi
if [ "$STEPS" -lt 16 ]; then
  echo "gpu_check: GPU_CHECK_STEPS=$STEPS: failures are injected at steps 6 and 12; use at least 16" >&2
  exit 2
fi

rm -rf "$OUT" && mkdir -p "$OUT/configs"
WRAP="$PWD/scripts/one_gpu_rank.sh"  # every rank on GPU 0, each its own "host" to NCCL

# configs: the shipped ones plus the variations this check needs
"$PY" - "$OUT/configs" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def variant(name, base, top=None, **checkfree):
    cfg = json.loads(Path("ds_configs", base).read_text())
    cfg.update(top or {})
    cfg.setdefault("checkfree", {}).update(checkfree)
    (out / f"{name}.json").write_text(json.dumps(cfg, indent=1))
variant("stock", "baseline.json")
variant("checkfree", "checkfree.json")
variant("checkfree_plus", "checkfree_plus.json")
variant("bf16", "checkfree.json", {"bf16": {"enabled": True}})
variant("dp2x3", "checkfree.json", num_stages=3)
variant("checkpoint", "baseline.json", checkpoint_every=5, checkpoint_dir=str(out.parent / "ckpt"))
variant("redundant", "checkfree.json", mode="redundant")
EOF

[ "$ACCEL" = cpu ] || "$PY" - <<'EOF'
import torch
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
EOF

# name | ranks | config | expected recoveries (recovery events + checkpoint loads) | extra args
RUNS=(
  "stock|4|stock|0|"
  "checkfree|4|checkfree|2|--fail_at 1:6 --fail_at 2:12"
  "checkfree_plus|4|checkfree_plus|2|--fail_at 0:6 --fail_at 3:12"
  "bf16|4|bf16|2|--fail_at 1:6 --fail_at 2:12"
  "dp2x3|6|dp2x3|2|--num_layers 6 --fail_at 1.1:6 --fail_at 1:12"
  "checkpoint|4|checkpoint|1|--fail_at 0:12"
  "redundant|4|redundant|1|--fail_at 1:6"
  "real_kill|5|-|1|"
  "preempt|5|-|1|"
)
export DS_ACCELERATOR=$ACCEL OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SPEC="$OUT/runs.txt"; : > "$SPEC"
for run in "${RUNS[@]}"; do
  IFS='|' read -r name ranks config expect extra <<< "$run"
  if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ " $GPU_CHECK_ONLY " != *" $name "* ]]; then continue; fi
  echo "gpu_check: $name ($ranks ranks) ..."
  if [ "$name" = real_kill ] || [ "$name" = preempt ]; then
    sig=KILL; [ "$name" = preempt ] && sig=TERM  # preempt: a SIGTERM the victim answers with a hand-off
    timeout "$RUN_TIMEOUT" "$PY" scripts/kill_check.py --accelerator "$ACCEL" --out "$OUT/$name" --model "$MODEL" \
      --steps "$STEPS" --kill_step 6 --signal "$sig" --python "$PY" --timeout "$RUN_TIMEOUT" > "$OUT/$name.log" 2>&1
    rc=$?
    tail -n 3 "$OUT/$name.log"
    [ $rc -eq 0 ] || { echo "gpu_check: $name exited with status $rc; member logs in $OUT/$name"; }
    echo "$name $rc $expect" >> "$SPEC"
    continue
  fi
  # shellcheck disable=SC2086
  timeout "$RUN_TIMEOUT" "$PY" -m torch.distributed.run --standalone --nproc_per_node "$ranks" --no-python \
    "$WRAP" "$PY" launch/train.py --deepspeed_config "$OUT/configs/$config.json" --model "$MODEL" \
    --steps "$STEPS" --eval_every 0 --output_dir "$OUT/$name" $extra > "$OUT/$name.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || { echo "gpu_check: $name exited with status $rc; last lines of $OUT/$name.log:"; tail -n 15 "$OUT/$name.log"; }
  echo "$name $rc $expect" >> "$SPEC"
done

# opt-in: issue #29's recovery benchmark on NCCL (GPU_CHECK_SCALING="4x1,4x2", shapes STAGESxREPLICAS;
# GPU_CHECK_SCALING_KILLS per shape, default 3): real SIGKILLs, a coordinator and every member
# started by hand, each its own NCCL host on GPU 0 (benchmarks/recovery_scaling.py --launcher direct).
# A measurement, not a pass/fail check: its table goes to $OUT/recovery_scaling_nccl.md.
if [ -n "${GPU_CHECK_SCALING:-}" ]; then
  echo "gpu_check: recovery_scaling on $ACCEL, shapes $GPU_CHECK_SCALING ..."
  timeout "$RUN_TIMEOUT" "$PY" -m benchmarks.recovery_scaling --launcher direct --accelerator "$ACCEL" \
    --shapes "$GPU_CHECK_SCALING" --kills "${GPU_CHECK_SCALING_KILLS:-3}" --timeout_s 300 \
    --out "$OUT/recovery_scaling_nccl.csv" > "$OUT/recovery_scaling_nccl.log" 2>&1 \
    || echo "gpu_check: recovery_scaling exited with status $? (log $OUT/recovery_scaling_nccl.log)"
  grep -E "kill [0-9]+:|kills in|FAILED" "$OUT/recovery_scaling_nccl.log"
fi

"$PY" - "$OUT" "$STEPS" <<'EOF'
import json, math, statistics, sys
from pathlib import Path
out, steps = Path(sys.argv[1]), int(sys.argv[2])
rows, bad = [], []
for line in (out / "runs.txt").read_text().split("\n"):
    if not line.strip():
        continue
    name, rc, expect = line.split()
    path = out / name / "metrics.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    st = [r for r in recs if "loss" in r and "event" not in r]
    rec = sum(1 for r in recs if r.get("event") in ("recovery", "checkpoint_load"))
    losses = [r["loss"] for r in st]
    dt = statistics.median(r["step_time_s"] for r in st) if st else float("nan")
    why = []
    if rc != "0":
        why.append(f"exit {rc}")
    if len({r["step"] for r in st}) != steps:
        why.append(f"{len({r['step'] for r in st})}/{steps} steps")
    if rec != int(expect):
        why.append(f"{rec} recoveries, expected {expect}")
    if not losses or not all(math.isfinite(x) for x in losses):
        why.append("non-finite or no loss")
    elif losses[-1] >= losses[0]:
        why.append("loss did not fall")
    loss = f"{losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "-"
    rows.append((name, f"{len(st)}", loss, f"{rec}/{expect}", f"{dt:.3f}", "ok" if not why else "FAIL: " + "; ".join(why)))
    bad += [name] if why else []
head = ("run", "steps", "loss first -> last", "recoveries", "step time (s, median)", "result")
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
for r in rows:
    print("| " + " | ".join(r) + " |")
if bad:
    print(f"gpu_check: FAILED: {', '.join(bad)} (logs in {out})")
    sys.exit(1)
print(f"gpu_check: all {len(rows)} runs passed (logs and metrics in {out})")
EOF
