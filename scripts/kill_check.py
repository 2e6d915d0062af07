"""A real SIGKILL without MPI: a coordinator, S stage processes and one spare started by hand
(``--join``), the process holding stage ``--victim`` killed once step ``--kill_step`` completed.
``--signal TERM`` sends a preemption notice instead: the victim must hand its stage off
(recovery method ``handoff``) and exit 0.

This is how ``scripts/gpu_check.sh`` checks the NCCL data plane on one GPU (every member made
its own "host" to NCCL: ``NCCL_HOSTID=host<i>``, ``CUDA_VISIBLE_DEVICES=0``, ``LOCAL_RANK=0``,
``NCCL_SOCKET_IFNAME=lo``); with ``--accelerator cpu`` the same recipe runs on gloo, which
checks this script, not the GPU path. Passes when the survivors and the spare finish every
step with finite losses and exactly one recovery; prints kill -> next completed step.

    python scripts/kill_check.py --accelerator cuda --out out/kill_check --steps 24 --kill_step 10
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

from ds_checkfree.testing import REPO as ROOT
from ds_checkfree.testing import events_of, read_metrics, recovery_phases, steps_of
from ds_checkfree.testing.direct_job import DirectJob, member_pids, start_up_roles


def wait_for(what: str, cond, timeout: float, procs) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        dead = [p.args[-1] if isinstance(p.args, list) else "?" for p in procs if p.poll() not in (None, 0)]
        if dead:
            raise RuntimeError(f"waiting for {what}: a process failed ({dead})")
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not within {timeout:.0f} s")


def run(a) -> dict:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((ROOT / "ds_configs" / "checkfree.json").read_text())
    cfg["checkfree"].update(num_stages=a.stages, heartbeat_timeout_s=a.heartbeat_timeout_s)
    cfg_path = out / "ds_config.json"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    job = DirectJob(cfg_path, out, a.steps, a.stages + 1, num_stages=a.stages, accelerator=a.accelerator,
                    model=a.model, extra=["--num_layers", str(a.num_layers)] if a.num_layers else [],
                    python=a.python, timeout_s=60)
    procs, logs = [job.proc, *job.members], job.logs[1:]
    try:
        wait_for("every member to join", lambda: len(member_pids(logs)) == a.stages + 1, a.timeout, procs)
        wait_for(f"step {a.kill_step}", lambda: any(r["step"] >= a.kill_step
                                                     for r in steps_of(read_metrics(out, missing_ok=True))),
                 a.timeout, procs)
        roles, pids = start_up_roles(job.coordinator_log), member_pids(logs)
        victim = next((m for m, slot in roles.items() if slot == a.victim), None)
        if victim is None or victim not in pids:
            raise RuntimeError(f"no member holds stage {a.victim} (roles {roles}, pids {pids})")
        os.kill(pids[victim], getattr(signal, f"SIG{a.signal}"))
        killed_at = time.time()
        members = procs[1:]
        deadline = time.time() + a.timeout
        while time.time() < deadline and any(p.poll() is None for p in members):
            time.sleep(0.2)
        by_pid = {p.pid: p for p in members}
        codes = {mid: by_pid[pid].poll() if pid in by_pid else "?" for mid, pid in pids.items()}
    finally:
        job.stop(dump_stacks=True)  # a member still running here is stuck: its threads' stacks go to its log
    records = read_metrics(out, missing_ok=True)
    steps = steps_of(records)
    recoveries = events_of(records, "recovery")
    timeline = next((r for r in records if r.get("event") == "recovery_timeline"), {})
    losses = [r["loss"] for r in steps]
    result = {"accelerator": a.accelerator, "signal": a.signal, "stages": a.stages, "victim_stage": a.victim,
              "victim_member": victim, "methods": [r.get("method") for r in recoveries],
              "exit_codes": codes, "steps_done": len({r["step"] for r in steps}), "steps": a.steps,
              "recoveries": len(recoveries), "loss_first": losses[0] if losses else None,
              "loss_last": losses[-1] if losses else None,
              "kill_to_next_step_s": (timeline["next_step_done_at"] - killed_at) if "next_step_done_at" in timeline
              else None}
    why = []
    expected_victim_code = 0 if a.signal == "TERM" else -signal.SIGKILL  # a hand-off exits 0
    if any(code != 0 for i, code in codes.items() if i != victim) or codes.get(victim) != expected_victim_code:
        why.append(f"exit codes {codes} (member {victim} got SIG{a.signal}, expected {expected_victim_code})")
    if a.signal == "TERM" and result["methods"] != ["handoff"]:
        why.append(f"recovery methods {result['methods']}, expected a hand-off")
    if result["steps_done"] != a.steps:
        why.append(f"{result['steps_done']}/{a.steps} steps")
    if result["recoveries"] != 1:
        why.append(f"{result['recoveries']} recoveries, expected 1")
    if not losses or not all(math.isfinite(x) for x in losses):
        why.append("non-finite or no loss")
    result["failed"] = why
    try:
        result["phases"] = recovery_phases(records, killed_at, "gloo" if a.accelerator == "cpu" else "nccl")
    except (StopIteration, KeyError):
        result["phases"] = []  # no recovery event: already a failure above
    (out / "kill_check.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accelerator", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--out", default="out/kill_check")
    p.add_argument("--model", default="tiny")
    p.add_argument("--num_layers", type=int, default=None, help="override the preset's decoder layer count")
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--kill_step", type=int, default=10)
    p.add_argument("--victim", type=int, default=1, help="stage whose process is killed (an intermediate one)")
    p.add_argument("--signal", choices=("KILL", "TERM"), default="KILL",
                   help="KILL: a death; TERM: a preemption notice (the victim hands its stage off)")
    p.add_argument("--heartbeat_timeout_s", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for each phase (start-up, training)")
    p.add_argument("--python", default=sys.executable)
    a = p.parse_args(argv)
    if not 0 < a.victim < a.stages - 1 or a.kill_step >= a.steps:
        p.error("--victim must be an intermediate stage and --kill_step < --steps")
    try:
        r = run(a)
    except RuntimeError as err:
        print(f"kill_check: FAILED: {err} (logs in {a.out})")
        return 1
    took = "-" if r["kill_to_next_step_s"] is None else f"{r['kill_to_next_step_s']:.2f} s"
    print(f"kill_check ({a.accelerator}): SIG{a.signal} of stage {a.victim} after step {a.kill_step}: "
          f"{r['steps_done']}/{a.steps} steps, {r['recoveries']} recovery ({', '.join(map(str, r['methods']))}), "
          f"loss {r['loss_first']} -> {r['loss_last']}, signal -> next completed step {took}")
    for name, seconds in r.get("phases", []):
        print(f"  {name:<50} {seconds:8.3f} s")
    if r["failed"]:
        print(f"kill_check: FAILED: {'; '.join(r['failed'])} (logs in {a.out})")
        return 1
    print("kill_check: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
