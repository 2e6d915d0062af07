"""Tables, plot and notes of ``benchmarks/recovery_scaling.py`` (recovery phases against job
size), from its per-kill CSV: the row schema, medians per shape, each phase divided by the
step time, the engine rebuild's parts, and the notes on what grows and why.

    .venv/bin/python -m benchmarks.recovery_scaling --report_only
"""
from __future__ import annotations

import csv
import os
import statistics
from pathlib import Path

#: (column, label) of each phase, in the order they happen
PHASES = [("detection_s", "detection"), ("teardown_s", "snapshot + leave plane"), ("agreement_s", "agreement"),
          ("data_plane_s", "data plane"), ("engine_rebuild_s", "engine rebuild"),
          ("rematerialise_s", "re-materialise"), ("redo_step_s", "redone step"), ("total_s", "total")]
#: the engine rebuild's parts (the recovery event's ``rebuild_*``): the module with its process
#: groups, of which forming the groups (``new_group`` calls) alone and that member's CPU time in
#: them (the rest: waiting for the groups' other members), and DeepSpeed's engine
REBUILD_PARTS = ["rebuild_module_s", "rebuild_groups_s", "rebuild_groups_cpu_s", "rebuild_engine_s"]
#: the groups across members: the writer's groups kept from before the loss (idle copies), the
#: slowest member's time in forming groups anew, and how many members formed any (every
#: member's rebuild line; blank in runs from before these were recorded)
GROUP_COUNTS = ["rebuild_groups_kept", "groups_slowest_s", "members_forming"]
ROW_KEYS = ["shape", "stages", "replicas", "ranks", "micro_batch", "micro_batches", "kill", "victim_slot",
            "victim_stage", "method", "after_step",
            "step_time_s", *[k for k, _ in PHASES], *REBUILD_PARTS, "timeout_reached", "join_latency_s",
            *GROUP_COUNTS]
META_KEYS = ["commit", "date", "machine", "protocol"]


def read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key in ("stages", "replicas", "ranks", "kill", "victim_slot", "victim_stage", "after_step"):
            r[key] = int(r[key])
        for key, before in (("micro_batch", 4), ("micro_batches", 4)):  # rows from before the option: 4 x 4
            r[key] = int(r[key]) if r.get(key) not in ("", None) else before
        for key in ["step_time_s", *[k for k, _ in PHASES], *REBUILD_PARTS, "join_latency_s", *GROUP_COUNTS]:
            r[key] = float(r[key]) if r.get(key) not in ("", "None", None) else float("nan")
        r["timeout_reached"] = r["timeout_reached"] == "True"
    return rows


def write_rows(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=ROW_KEYS + META_KEYS)
        w.writeheader()
        for r in sorted(rows, key=lambda r: (r["ranks"], r["stages"], r["kill"])):
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k in w.fieldnames})


def summary(rows: list[dict]) -> list[dict]:
    """Per shape: kills, medians (min-max) of each phase, kills without a timeout, under 1 s."""
    out = []
    # by ranks, then stages (the docs' table's order; a set's own order varies between runs)
    for shape in sorted({r["shape"] for r in rows},
                        key=lambda s: (next(r["ranks"] for r in rows if r["shape"] == s), int(s.split("x")[0]))):
        mine = [r for r in rows if r["shape"] == shape]
        entry = {"shape": shape, "ranks": mine[0]["ranks"], "kills": len(mine),
                 "methods": "/".join(sorted({r["method"] for r in mine})),
                 "workload": "/".join(sorted({f"{r['micro_batches']} x {r['micro_batch']}" for r in mine})),
                 "no_timeout": sum(not r["timeout_reached"] for r in mine),
                 "under_1s": sum(r["total_s"] < 1.0 for r in mine),
                 "step_time_s": statistics.median(r["step_time_s"] for r in mine)}
        for key, _ in PHASES:
            vals = [r[key] for r in mine]
            entry[key] = (statistics.median(vals), min(vals), max(vals))
        for key in [*REBUILD_PARTS, "join_latency_s", *GROUP_COUNTS]:
            known = [r[key] for r in mine if r[key] == r[key]]
            entry[key] = statistics.median(known) if known else float("nan")
        out.append(entry)
    return out


#: what the runs of 2026-12-02 showed beyond the tables (kept with them; re-read when re-measuring)
NOTES = """## Notes (runs of 2026-12-03, 01:59-02:14 UTC, commit b991d68)

- No kill reached a timeout (gloo's, the data plane's or the agreement's): before the waits were made
  interruptible (`ds_checkfree.elastic.plane_waits`), 2 of 3 kills at 4x3/4x4 waited out the 30 s data-plane
  timeout (issue #29).
- Workload: 2 micro-batches of one sequence per replica and step, the smallest pipeline step. The
  earlier runs of this benchmark (commit e7488b8's recovery_scaling.csv) used 4 micro-batches of 4
  sequences: step 0.58 s at 4x3 and 0.78 s at 4x4, recoveries 1.40 / 1.66 s median, none under 1 s;
  that redone step alone took most of the second. The redone step is an ordinary step (the data
  resumes at the interrupted one), not a recovery cost.
- The VM's speed varies between sessions by up to a third (4x4's step: 0.316 s at 14:18-15:32 UTC on
  commit 7fc2a32, 0.229 s at 16:51-17:08 on 6e1a7fa, 0.265 s here): compare shapes within one file, not
  across files, and changes by A/B runs back to back.
- On 2 cores every member's CPU work shares the same cores, so the step time itself grows with the
  process count, and so does every phase in which every member works (detection: the error surfaces at
  the member's next communication; teardown; re-materialisation). Their ratios to the step time stay
  roughly flat or fall.
- The data plane (forming the default group) is flat: 2-14 ms up to 17 ranks, 16-33 ms at 33, 0.02-0.09 of a
  step at every size. It used to be a full mesh, each member connecting to every other member, and grew
  with the job (0.009 s at 5 ranks to 0.195 s at 33 on commit 6e1a7fa, 0.51 of a step at 32x1); it only
  carries point-to-point between pipe neighbours (and one replica's loss broadcast), so gloo now connects
  a pair of it on the pair's first use (`GlooPlane.forming_default_group`). A/B back to back
  (`lazy_default_group_ab.csv`, 3-5 kills per shape and side): recovery 0.982 / 1.249 s against 1.198 /
  1.464 s at 32x1 / 4x8, 0.479 against 0.564 s at 4x3; at 4x4 0.725 / 0.752 s against 0.642 / 0.801 s
  in two rounds (no difference the noise lets through).
- Groups kept (issue #29, "rebuild only what changed"; `ds_checkfree.elastic.standby_groups`): every member
  forms idle copies of its groups in the background, 2-9 steps into each generation, and a recovery takes
  the copy of every group without the lost slot. Only the members of the lost slot's pipe and data-parallel
  column form any group (last table: 7 of 16 at 4x4, 11 of 32 at 4x8; with one replica only the
  replacement, whose pipe is the default group). Each member's CPU time in forming groups stays at 1-5 ms.
  The slowest member's wall time in them still grows with the process count (0.053 s at 4x4, 0.153 s at
  4x8): the groups formed anew wait for their last member, most often the replacement, and the members'
  arrival spread grows with the contention for two cores. A/B back to back (`kept_groups_ab.csv`, 10 kills
  per shape and side, medians in its meta file): the slowest member's forming falls by about a fifth at 4x4
  and 4x8, the recovery is no faster within the noise: the kept groups' members wait out the same spread in
  the redone step's first collective. Before the copies, a member with R replicas waited in its
  data-parallel group of R for the slowest of them whatever slot was lost (30-43 ms from 9 to 17 ranks,
  0.114 s at 4x8 on commit 2a38949).
- Where that time went at 4x8 (`group_forming_trace_4x8.csv`: one traced recovery, every rank's `new_group`
  calls, commit fa557b8, the default group still a full mesh): members start forming groups 0-98 ms apart
  (the spread the data-plane phase left them with),
  wait in their pipe group (39 ms median per member) and in their data-parallel group of 8 (63 ms), then form
  their own group of one (DeepSpeed's model-parallel group with one rank per stage; 33 ms, round trips to the
  store) among 31 calls for other ranks' groups of one (43 ms in all: time the process was not scheduled);
  11 ms of CPU. Forming each group by its members alone (torch's `use_local_synchronization`, the other ranks
  skipping the call) made no difference that 3 kills per side could show (`group_forming_ab.csv`: 65 / 148 ms
  at 4x4 / 4x8 against 49 / 196 ms, on a slower stretch of the VM than commit 6e1a7fa's table): not used.
- `TORCH_GLOO_LAZY_INIT=1` for every group (connect each pair on first use, so a group forms without waiting
  for its members; now used for the default group alone, above), A/B on this VM on fa557b8's code, 3 kills
  per shape and side (`gloo_lazy_init_ab.csv`): forming the groups 4 / 18 ms (4x1 / 4x4) against 5 / 33 ms,
  the data plane 1 / 7 ms against 9 / 39 ms; but the connections of every group then form in the redone
  step (0.301 s against 0.212 s at 4x4) and the recovery was no faster (0.149 / 0.758 s against
  0.160 / 0.616 s median). Not used.
- At 33 ranks the data plane took 5.2 s in the first runs (commit 8160dac, both shapes): torch's TCPStore
  client handshake stalls exactly 5.0 s when ~30 clients connect at once (reproduced without this project:
  32 processes forming gloo groups through fresh TCPStore clients under torchrun, 5.0-5.3 s stalls in most
  generations at 32, rarely at 16, with either store server and with connects staggered by 10 ms; plain
  Python sockets on the same VM, gVisor, show no such stall). Each member now opens the next generation's
  client while the current one trains, spread over its first 8 steps (`ds_checkfree.elastic.store_clients`):
  the data plane takes 0.15-0.2 s there. A first try that opened all clients at the same step stalled in
  the background and, with a kill landing in that window, delayed detection by ~3 s in 2 of 8 kills;
  spreading them removed it.
- 33 ranks are still around or over 1 s (32x1 1.051 s, 2 of 4 kills under 1 s; 4x8 1.269 s): every phase
  grows with the 33 processes' contention for two cores (the step alone is 0.47-0.51 s).
"""


def markdown(rows: list[dict]) -> str:
    meta = rows[-1] if rows else {}
    lines = ["# Recovery phases against job size (`benchmarks/recovery_scaling.py`)", "",
             f"Commit {meta.get('commit', '?')}, {meta.get('date', '?')}; machine: {meta.get('machine', '?')}.", "",
             f"Protocol: {meta.get('protocol', '?')}. Seconds; median [min-max] over the kills of each shape.",
             "", "| shape | ranks | micro-batches x sequences | kills | method | step time | " +
             " | ".join(l for _, l in PHASES) + " | no timeout | total < 1 s | join latency |",
             "|" + "---|" * (len(PHASES) + 9)]
    for e in summary(rows):
        cells = [f"{e[k][0]:.3f} [{e[k][1]:.3f}-{e[k][2]:.3f}]" for k, _ in PHASES]
        lines.append(f"| {e['shape']} | {e['ranks']} | {e['workload']} | {e['kills']} | {e['methods']} | "
                     f"{e['step_time_s']:.3f} | "
                     + " | ".join(cells) + f" | {e['no_timeout']}/{e['kills']} | {e['under_1s']}/{e['kills']} | "
                     f"{e['join_latency_s']:.1f} |")
    lines += ["", "## Each phase against the step time", "",
              "Each phase's median divided by the shape's median step time: on 2 cores every member's CPU "
              "work shares the same cores, so a phase whose ratio stays flat grows only with the step (CPU "
              "contention); a ratio that grows is growth of the protocol itself.", "",
              "| shape | ranks | " + " | ".join(l for k, l in PHASES if k != "total_s")
              + " | engine rebuild: forming the groups |",
              "|" + "---|" * (len(PHASES) + 2)]
    for e in summary(rows):
        lines.append(f"| {e['shape']} | {e['ranks']} | " + " | ".join(
            f"{e[k][0] / e['step_time_s']:.2f}" for k, _ in PHASES if k != "total_s")
            + f" | {e['rebuild_groups_s'] / e['step_time_s']:.2f} |")
    lines += ["", "## The engine rebuild's parts", "", "The engine rebuild's parts (median s; blank: not recorded by that run): the pipeline module "
              "with DeepSpeed's process groups (each set of members formed once, by its own members), and "
              "DeepSpeed's engine (config, optimizer; no start-up weight broadcast in a rebuild).", "",
              "| shape | ranks | engine rebuild | module + its groups | of which forming the groups "
              "| CPU time in forming them | DeepSpeed engine |",
              "|---|---|---|---|---|---|---|"]
    for e in summary(rows):
        parts = " | ".join("" if e[k] != e[k] else f"{e[k]:.3f}" for k in REBUILD_PARTS)
        lines.append(f"| {e['shape']} | {e['ranks']} | {e['engine_rebuild_s'][0]:.3f} | {parts} |")
    lines += ["", "## Groups kept and formed across members", "",
              "Groups kept from before the loss (idle copies, `ds_checkfree.elastic.standby_groups`) by the "
              "metrics writer, and, from every member's rebuild line, the slowest member's time in forming "
              "groups anew and how many members formed any (median over the kills; blank: not recorded by "
              "that run).", "",
              "| shape | ranks | members | writer's groups kept | members forming any group | "
              "slowest member forming groups s |",
              "|---|---|---|---|---|---|"]
    for e in summary(rows):
        kept, slowest, forming = (e[k] for k in GROUP_COUNTS)
        members = e["ranks"] - 1
        lines.append(f"| {e['shape']} | {e['ranks']} | {members} | {'' if kept != kept else f'{kept:.0f}'} | "
                     f"{'' if forming != forming else f'{forming:.0f}'} | "
                     f"{'' if slowest != slowest else f'{slowest:.3f}'} |")
    return "\n".join(lines) + "\n\n" + NOTES


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    entries = summary(rows)
    stages = {e["shape"]: int(e["shape"].split("x")[0]) for e in entries}
    replicas = {e["shape"]: int(e["shape"].split("x")[1]) for e in entries}
    series = [(f"{s} stages, R replicas", [e for e in entries if stages[e["shape"]] == s])
              for s in sorted(set(stages.values()))] + \
             [(f"S stages, {r} replica{'s' if r > 1 else ''}", [e for e in entries if replicas[e["shape"]] == r])
              for r in sorted(set(replicas.values()))]
    series = [(name, es) for name, es in series if len(es) >= 2] or [("median", entries)]
    # the phases, then the engine rebuild's group forming on its own (the part issue #29 asks to stay flat)
    panels = [*PHASES, ("rebuild_groups_s", "engine rebuild: forming the groups (writer)")]
    fig, axes = plt.subplots(3, 3, figsize=(14, 10), sharex=True)
    for ax, (key, label) in zip(axes.flat, panels):
        for r in rows:
            ax.plot(r["ranks"], r[key], "o", color="0.7", ms=4)
        for i, (name, es) in enumerate(series):
            med = [e[key][0] if isinstance(e[key], tuple) else e[key] for e in es]
            ax.plot([e["ranks"] for e in es], med, "-o", color=f"C{i}", label=f"median, {name}")
            if key == "rebuild_groups_s":
                cpu = [e["rebuild_groups_cpu_s"] for e in es]
                ax.plot([e["ranks"] for e in es], cpu, ":", color=f"C{i}", label=f"CPU time in them, {name}")
                slowest = [(e["ranks"], e["groups_slowest_s"]) for e in es if e["groups_slowest_s"] == e["groups_slowest_s"]]
                if slowest:
                    ax.plot(*zip(*slowest), "--", color=f"C{i}", label=f"slowest member, {name}")
            if key == "redo_step_s":
                ax.plot([e["ranks"] for e in es], [e["step_time_s"] for e in es], "--", color=f"C{i}",
                        label=f"step time, {name}")
        if key in ("detection_s", "redo_step_s", "rebuild_groups_s"):
            ax.legend(fontsize=7)
        ax.set_title(label)
        ax.set_xscale("log", base=2)
        ax.set_xticks([e["ranks"] for e in entries], [str(e["ranks"]) for e in entries])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("ranks (stages x replicas + 1 spare)")
    for ax in axes[:, 0]:
        ax.set_ylabel("seconds")
    fig.suptitle("Recovery phases against job size (kill -> next completed step; grey: each kill)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(rows: list[dict], csv_path: str) -> None:
    write_rows(csv_path, rows)
    base = os.path.splitext(csv_path)[0]
    Path(base + ".md").write_text(markdown(rows))
    plot(rows, base + ".png")
    print(markdown(rows))
    print(f"wrote {csv_path}, {base}.md, {base}.png")
