"""The kill campaign's report: the summary table, the goal check and the protocol, written as
``kill_campaign.csv`` (one row per run) and ``kill_campaign.md`` after every run, so an
interrupted campaign leaves the runs it finished (``benchmarks/kill_campaign.py`` runs them)."""
from __future__ import annotations

import csv
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

from ds_checkfree.testing import BIN, job_env

COLUMNS = ["run", "scenario", "seed", "mode", "spares", "victims", "kill_step", "kill_moment_s", "kill_moment_frac",
           "kill_at_s", "outcome", "reason", "rc", "joiner_rc", "steps_done", "recovery_rounds", "recovery_s",
           "join_latency_s", "step_time_s", "hb_timeout_s", "wall_s", "note", "log_dir"]


def fmt(values, f=statistics.median):
    return f"{f(values):.2f}" if values else "-"


def summary_rows(rows: list[dict], scenarios, describe: dict) -> list[list[str]]:
    table = []
    groups = [(s, [r for r in rows if r["scenario"] == s]) for s in scenarios] + [("overall", rows)]
    for name, rs in groups:
        if not rs:
            continue
        rec = [r["recovery_s"] for r in rs if r.get("recovery_s") is not None]
        join = [r["join_latency_s"] for r in rs if r.get("join_latency_s") is not None]
        count = {o: sum(r["outcome"] == o for r in rs) for o in ("survived", "survived_rc4", "clean_stop", "hang",
                                                                   "unclean", "harness_error")}
        table.append([name if name == "overall" else f"{name}: {describe[name]}", str(len(rs)),
                      str(count["survived"]), str(count["survived_rc4"]), str(count["clean_stop"]), str(count["hang"]),
                      str(count["unclean"] + count["harness_error"]), fmt(rec), fmt(rec, max), fmt(join),
                      fmt(join, max)])
    return table


def goal_check(rows: list[dict]) -> tuple[bool, list[str]]:
    lines, ok = [], True
    hangs = [r for r in rows if r["outcome"] == "hang"]
    lines.append(f"hangs: {len(hangs)} (goal 0) -> {'OK' if not hangs else 'FAILED'}")
    ok &= not hangs
    over = []
    checked = 0
    for r in rows:
        if r["scenario"] == "join" or r.get("recovery_s") is None or not r.get("step_time_s"):
            continue
        checked += 1
        bound = r["hb_timeout_s"] + 2 * r["step_time_s"]
        if r["recovery_s"] >= bound:
            over.append(f"run {r['run']} ({r['scenario']}): {r['recovery_s']:.2f} s >= {bound:.2f} s")
    lines.append(f"recoveries under heartbeat timeout + 2 step times: {checked - len(over)} of {checked} "
                 f"-> {'OK' if not over else 'FAILED: ' + '; '.join(over)}")
    ok &= not over
    no_rec = [r for r in rows if r["outcome"] in ("survived", "survived_rc4") and r.get("recovery_s") is None
              and r["scenario"] not in ("startup_kill",) and r.get("victims") != "coordinator"]
    if no_rec:
        lines.append("survived without a measured recovery (kill after the last step?): runs "
                     + ", ".join(str(r["run"]) for r in no_rec))
    return ok, lines


def machine() -> str:
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = []
    try:
        import torch
        versions.append(f"torch {torch.__version__}")
    except ImportError:
        pass
    try:
        from importlib.metadata import version
        versions.append(f"deepspeed {version('deepspeed')}")
        versions.append(f"mpi4py {version('mpi4py')}")
    except Exception:  # noqa: BLE001
        pass
    try:
        ompi = subprocess.run([str(BIN / "mpirun"), "--version"], capture_output=True, text=True, timeout=30,
                              env=job_env()).stdout.splitlines()[0]
        versions.append(ompi)
    except Exception:  # noqa: BLE001
        pass
    return (f"{platform.node()}: {cpu}, {len(os.sched_getaffinity(0))} cores usable, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, " + ", ".join(versions))


def markdown_table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def report(args, scenarios, rows, t0, started, final: bool, describe: dict) -> bool:
    """Write the CSV and the .md (after every run, so an interrupted campaign leaves its runs); print at the end."""
    elapsed = time.time() - t0

    header = ["scenario", "runs", "survived", "all steps but rc 4 (evicted process's exit)", "clean stops", "hangs", "unclean", "recovery median (s)",
              "recovery max (s)", "join latency median (s)", "join latency max (s)"]
    table = markdown_table(header, summary_rows(rows, scenarios, describe))
    ok, goal_lines = goal_check(rows)
    if final:
        print("\n" + table + "\n")
        print("goal (0 hangs, every recovery under heartbeat timeout + 2 step times): " + ("MET" if ok else "NOT MET"))
    if final:
        for line in goal_lines:
            print("  " + line)

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    step_times = [r["step_time_s"] for r in rows if r.get("step_time_s")]
    per_run = markdown_table(
        ["run", "scenario", "mode", "victims", "kill after step (+s)", "outcome", "recovery (s)", "join latency (s)",
         "reason / note"],
        [[str(r["run"]), r["scenario"], str(r.get("mode")), str(r.get("victims")),
          f"{r.get('kill_step')} (+{r.get('kill_moment_s')})", r["outcome"],
          "-" if r.get("recovery_s") is None else f"{r['recovery_s']:.2f}",
          "-" if r.get("join_latency_s") is None else f"{r['join_latency_s']:.2f}",
          "; ".join(x for x in (r.get("reason", "") if r["outcome"] != "survived" else "", r.get("note", ""))
                    if x).replace("|", "/")] for r in rows])
    md = f"""# Kill campaign (issue #12)

`python -m benchmarks.kill_campaign --runs {args.runs} --seed {args.seed} --steps {args.steps} --timeout_s {args.timeout_s:g}`
(scenarios: {', '.join(scenarios)}), started {started}, {elapsed / 60:.1f} min{'' if final else f', INTERRUPTED after {len(rows)} runs'}.{(' Code: ' + args.code_note) if args.code_note else ''}

{table}

Goal (0 hangs, every recovery under heartbeat timeout + 2 step times): **{'met' if ok else 'not met'}**
{chr(10).join('- ' + line for line in goal_lines)}

## Protocol

- Machine: {machine()}. Other engineers' heavy jobs were serialised with this one by
  `flock /tmp/heavy.lock`; the machine may still carry light load.
- Each run: `mpirun --with-ft ulfm --oversubscribe --map-by slot --bind-to none -n 4+spares
  python launch/train.py --model tiny --steps {args.steps} --eval_every 0` (`--fault_tolerant` with no spare),
  `DS_ACCELERATOR=cpu OMP_NUM_THREADS=1`, config `ds_configs/checkfree.json` with the scenario's mode, spares
  and timeouts (heartbeat interval 0.5 s, heartbeat timeout 10 s unless stated, data-plane timeout 30 s).
  Median step time over the runs: {fmt(step_times)} s.
- Scenarios (drawn balanced: the list repeated to {args.runs} runs, shuffled with seed {args.seed}; each run's
  victim(s), mode, kill step and moment from its own seed, in the CSV): {'; '.join(f'`{s}`: {describe[s]}' for s in scenarios)}.
  Single-victim draws: CheckFree (victim stage 1 or 2) or CheckFree+ (any stage). Non-adjacent pairs: (0,2),
  (1,3), (0,3). `second_kill`'s second victim: a stage not adjacent to the first, or spare rank 4 (the one
  taking the first victim's place).
- Moment: mid-run kills after step k ~ U[5, 25] plus a delay ~ U[0, 1) x that step's time (forward, backward
  or optimizer step); start-up kills 1-8 s after the victim's process appeared.
- Hard timeout {args.timeout_s:g} s per run (launch to exit of mpirun and any joiner); past it the run is a hang.
- Outcomes: survived = rc 0 and steps 1..{args.steps} all in metrics.jsonl (and the joiner exited 0);
  "all steps but rc 4" = every step done, no Traceback, and mpirun's non-zero status is the exit status 4
  (`EXIT_EVICTED`) of the stopped process, which left by itself after SIGCONT once evicted; clean stop = non-zero rc with an `unrecoverable` event or a `fatal:` line and no Traceback; unclean = the rest.
- Recovery = kill (the first one; the SIGSTOP) -> `next_step_done_at` of the first `recovery_timeline` after the
  last kill; join latency = joiner command start -> that same event. The goal's bound is per run (its heartbeat
  timeout + 2 x its median step time); join runs are judged by their join latency instead (their recovery
  includes the 2 s wait and the joiner's start-up).

## Runs

{per_run}
"""
    md_path = os.path.splitext(args.out)[0] + ".md"
    Path(md_path).write_text(md)
    if final:
        print(f"\nwrote {args.out} and {md_path} ({elapsed / 60:.1f} min); logs in {args.work}")
    return ok
