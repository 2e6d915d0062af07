"""The tables the docs show, each made from its results files (``GENERATORS``: block name -> function).

Every table ends with its source: the file(s), the code commit, the date and the machine, read
from the ``*.meta.json`` sidecar that lists the file. Rounding is the only change made to a
value; means and standard deviations are computed here from the per-run rows.
"""
from __future__ import annotations

import csv
import json
import os
import statistics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(REPO, "benchmarks", "results")
LINK_PREFIX = "../benchmarks/results/"   # generated blocks live in docs/*.md


def rows(name: str) -> list[dict]:
    with open(os.path.join(RESULTS, name), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def meta_path(name: str) -> str:
    """The sidecar (``*.meta.json``) that lists results file ``name`` (relative to benchmarks/results)."""
    for root, _, files in sorted(os.walk(RESULTS)):
        for m in sorted(f for f in files if f.endswith(".meta.json")):
            with open(os.path.join(root, m), encoding="utf-8") as f:
                listed = json.load(f)["files"]
            base = os.path.relpath(root, RESULTS)
            if any(os.path.normpath(os.path.join(base, x)) == os.path.normpath(name) for x in listed):
                return os.path.join(root, m)
    raise KeyError(f"no *.meta.json lists {name}")


def meta_of(name: str) -> dict:
    with open(meta_path(name), encoding="utf-8") as f:
        return json.load(f)


def source(*names: str) -> str:
    """One line per sidecar behind ``names``: the files, the code commit, the date, the machine, the command."""
    by_meta: dict[str, list[str]] = {}
    for name in names:
        by_meta.setdefault(meta_path(name), []).append(name)
    out = []
    for path, files in by_meta.items():
        meta = meta_of(files[0])
        links = ", ".join(f"[`{n}`]({LINK_PREFIX}{n})" for n in files)
        out.append(f"<sub>Source: {links}; code `{meta['code_commit'].split(' ')[0]}`; {meta['date']}; "
                   f"{meta['machine'].split(';')[0]}; `{meta['command'].split(';')[0]}`</sub>")
    return "  \n".join(out)


def table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in body]
    return "\n".join(lines)


def md_tables(text: str) -> list[tuple[str, list[list[str]]]]:
    """(the heading above it, rows of cells) for every pipe table of a markdown text."""
    out, heading, current = [], "", None
    for line in text.splitlines() + [""]:
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if current is None:
                current = (heading, [])
                out.append(current)
            if not all(set(c) <= set("-: ") for c in cells):
                current[1].append(cells)
        else:
            current = None
    return out


def md_table_rows(name: str, heading_has: str) -> list[list[str]]:
    """The rows (header first) of the first table under a heading containing ``heading_has``."""
    with open(os.path.join(RESULTS, name), encoding="utf-8") as f:
        return next(t for head, t in md_tables(f.read()) if heading_has in head)


def msd(values: list[float], digits: int) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"


# ------------------------------------------------------------------------------- real deaths
PHASES = (("detection", "detection (kill -> error seen by the last stage)"),
          ("snapshot + close sockets", "snapshot + close sockets"),
          ("agreement", "agreement"), ("new gloo group", "data plane (new gloo group)"),
          ("engine rebuild", "engine rebuild (in-memory state)"), ("re-materialise the stage", "re-materialisation"),
          ("redo the interrupted step", "redo the interrupted step"),
          ("**kill -> next completed step**", "total: kill -> next completed step"))
KILL_SESSIONS = (  # (column title, file, strategy prefix, value column)
    ("ULFM, before #14 (`e0efcd7`)", "real_failure_before.csv", "checkfree", "median"),
    ("ULFM agreement (`0a1c1bd`)", "real_failure.csv", "checkfree", "value"),
    ("coordinator (`1230941`)", "real_failure_before_rebuild.csv", "checkfree", "value"),
    ("coordinator, faster rebuild (`8b39ed3`)", "real_failure_coordinator.csv", "checkfree", "value"),
    ("same code, later session (`378063b`)", "real_failure_preempt.csv", "checkfree", "value"),
    ("no MPI, started by hand (`363ff54`)", "real_failure_manual_cpu.csv", "checkfree", "value"))


def _phase(name: str, strategy: str, phase: str, col: str) -> float | None:
    hit = [r for r in rows(name) if r["strategy"].startswith(strategy) and r["phase"].startswith(phase)]
    return float(hit[0][col]) if hit else None


def kill_phases() -> str:
    body = []
    for label, phase in PHASES:
        cells = [_phase(f, s, phase, c) for _, f, s, c in KILL_SESSIONS]
        body.append([label] + ["-" if v is None else (f"**{v:.3f} s**" if label.startswith("**") else f"{v:.3f} s")
                               for v in cells])
    return table(["phase (median of 3 kills)"] + [t for t, *_ in KILL_SESSIONS], body) + "\n\n" + \
        source(*[f for _, f, *_ in KILL_SESSIONS])


RESTARTS = (("mpirun relaunch, code `e0efcd7`", "real_failure_before.csv", "median"),
            ("mpirun relaunch, code `0a1c1bd`", "real_failure.csv", "value"),
            ("mpirun relaunch, code `378063b`", "real_failure_preempt.csv", "value"),
            ("torchrun relaunch (no MPI), code `363ff54`", "real_failure_manual_cpu.csv", "value"))


def restart_vs_checkfree() -> str:
    body = []
    for label, f, col in RESTARTS:
        cf = _phase(f, "checkfree", "total", col)
        body.append([label, meta_of(f)["date"].split(",")[0], f"{_phase(f, 'restart', 'job teardown', col):.2f} s",
                     f"{_phase(f, 'restart', 'relaunch', col):.1f} s", f"{_phase(f, 'restart', 'checkpoint load', col):.2f} s",
                     f"{_phase(f, 'restart', 'redo lost steps', col):.2f} s",
                     f"**{_phase(f, 'restart', 'total', col):.1f} s**", f"{cf:.3f} s"])
    return table(["restart from checkpoint (every 10 steps)", "session", "teardown", "relaunch to engine ready",
                  "load", "4 redone steps", "**kill -> next step**", "CheckFree, same session"], body) + "\n\n" + \
        source(*[f for _, f, _ in RESTARTS])


def preempt_phases() -> str:
    f = "real_failure_preempt.csv"
    body = [[r["phase"].strip(), r["value"] + ("" if "steps" in r["phase"] else " s")]
            for r in rows(f) if r["strategy"].startswith("preempted")]
    return table(["SIGTERM answered by a hand-off (median of 3)", "value"], body) + "\n\n" + source(f)


def kill_campaign() -> str:
    t = md_table_rows("kill_campaign.md", "Kill campaign")
    return table(t[0], t[1:]) + "\n\n" + source("kill_campaign.md", "kill_campaign.csv")


def heartbeat() -> str:
    f = "heartbeat_overhead.csv"
    return table(["quantity", "value"], [[r["phase"].strip(), r["value"]] for r in rows(f)]) + "\n\n" + source(f)


def recovery_scaling() -> str:
    """Medians per shape from the per-kill rows (benchmarks/recovery_scaling.py writes one per kill)."""
    f = "recovery_scaling.csv"
    data = rows(f)
    shapes = sorted({r["shape"] for r in data}, key=lambda s: (int(next(r["ranks"] for r in data if r["shape"] == s)),
                                                                 int(s.split("x")[0])))
    body = []
    for shape in shapes:
        rs = [r for r in data if r["shape"] == shape]

        def med(key, digits=3):
            return f"{statistics.median(float(r[key]) for r in rs):.{digits}f}"
        totals = [float(r["total_s"]) for r in rs]
        body.append([shape, rs[0]["ranks"], f"{rs[0]['micro_batches']} x {rs[0]['micro_batch']}", len(rs),
                     rs[0]["method"], med("step_time_s"), med("detection_s"), med("teardown_s"), med("agreement_s"),
                     med("data_plane_s"), med("rebuild_module_s"), med("rebuild_groups_s"), med("rebuild_engine_s"),
                     med("rematerialise_s"), med("redo_step_s"),
                     f"{statistics.median(totals):.3f} [{max(totals):.3f}]",
                     f"{sum(r['timeout_reached'] == 'False' for r in rs)}/{len(rs)}",
                     f"{sum(t < 1.0 for t in totals)}/{len(rs)}"])
    return table(["shape (stages x replicas)", "ranks (+1 spare)", "micro-batches x sequences", "kills", "method",
                  "step s", "detection s", "snapshot + leave s", "agreement s", "data plane s",
                  "module + its groups s", "of which forming the groups s", "DeepSpeed engine s", "re-materialise s",
                  "redone step s",
                  "kill -> next step s, median [max]", "no timeout", "under 1 s"], body) + "\n\n" + source(f)


# ------------------------------------------------------------------------------- logical failures
RECOVERY_LABELS = {"checkfree": "CheckFree, fp32 (weighted average)", "checkpoint": "checkpoint reload (global rollback)",
                   "checkfree_bf16": "CheckFree, bf16 (fp32 masters averaged)",
                   "replica_dp2": "dp=2, one replica lost (copy of its twin)",
                   "column_dp2": "dp=2, both replicas lost (weighted average)"}


def recovery() -> str:
    f, body = "recovery.csv", []
    data = rows(f)
    for name, label in RECOVERY_LABELS.items():
        rs = [r for r in data if r["strategy"] == name]
        if not rs:
            continue
        body.append([label, f"{statistics.fmean(float(r['step_s']) for r in rs):.3f}",
                     msd([float(r["recovery_s"]) for r in rs], 4), msd([float(r["fail_to_step_K_s"]) for r in rs], 3),
                     rs[0]["steps_lost"], f"{float(rs[0]['bytes']) / 1e6:.2f}"])
    return table(["strategy", "step s", "recovery s", "failure -> step 16 done again s", "steps lost",
                  "MB moved"], body) + "\n\n" + source(f)


def _ablation_gaps(name: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r in rows(name):
        out.setdefault(r["method"], []).append(float(r["gap_val_end"]))
    return out


def ablation_4st() -> str:
    f = "ablation.csv"
    gaps = _ablation_gaps(f)
    noise = statistics.stdev(float(r["val_end"]) for r in rows(f) if r["method"] == "no_failure")
    body = [[m, msd(v, 3)] for m, v in gaps.items() if m != "no_failure"]
    return table(["rule (stage 1 of 4 lost at step 60 of 120)", "validation-loss gap at the end, mean ± sd of 3 seeds"],
                 body + [["(seed sd of the no-failure loss)", f"{noise:.3f}"]]) + "\n\n" + source(f)


ABLATION_6 = (("Shakespeare, global clipping (DeepSpeed)", "ablation_6st_global.csv"),
              ("Shakespeare, per-stage clipping (reference)", "ablation_6st_stage.csv"),
              ("Python docs, global clipping", "ablation_6st_global_pydocs.csv"),
              ("Python docs, per-stage clipping", "ablation_6st_stage_pydocs.csv"))


def ablation_6st() -> str:
    methods, body = ("weighted_average", "mean", "copy_prev", "random"), []
    for label, f in ABLATION_6:
        gaps = _ablation_gaps(f)
        noise = statistics.stdev(float(r["val_end"]) for r in rows(f) if r["method"] == "no_failure")
        body.append([label] + [msd(gaps[m], 3) for m in methods] + [f"{noise:.3f}"])
    return table(["corpus, clipping", *methods, "no-failure seed sd"], body) + "\n\n" + \
        source(*[f for _, f in ABLATION_6])


# ------------------------------------------------------------------------------- failure-free cost
STEP_TIME = (("4 (8 layers), CPU", "step_time.csv"), ("6 (6 layers), CPU", "step_time_6stages.csv"),
             ("8 (8 layers), CPU", "step_time_8stages.csv"), ("4 (8 layers), one H200", "step_time_cuda_h200.csv"))


def _ratio(r: dict, cpu: bool = False) -> str:
    """"ratio [CI low, CI high]" of a step_time.py row, wall-clock or CPU time."""
    keys = ("cpu_ratio_vs_stock", "cpu_ratio_ci_lo", "cpu_ratio_ci_hi") if cpu else \
        ("ratio_vs_stock", "ratio_vs_stock_ci_lo", "ratio_vs_stock_ci_hi")
    value, lo, hi = (float(r[k]) for k in keys)
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"


def step_time() -> str:
    body = []
    for label, f in STEP_TIME:
        by = {r["variant"]: r for r in rows(f)}
        body.append([label, by["checkfree"]["rounds"], meta_of(f)["code_commit"].split(" ")[0],
                     _ratio(by["checkfree"]), _ratio(by["plus"]), _ratio(by["checkfree"], cpu=True),
                     _ratio(by["plus"], cpu=True)])
    return table(["stages, machine", "rounds", "code", "CheckFree / stock", "CheckFree+ / stock",
                  "CPU time CheckFree / stock", "CPU time CheckFree+ / stock"], body) + "\n\n" + \
        source(*[f for _, f in STEP_TIME])


def redundant_step_time() -> str:
    f = "step_time_redundant.csv"
    body = [[r["variant"], f"{float(r['median_s']):.4f}", _ratio(r), _ratio(r, cpu=True)] for r in rows(f)]
    return table(["engine", "median step s", "step time / stock [95% CI]", "CPU time / stock [95% CI]"], body) + \
        "\n\n" + source(f)


def memory() -> str:
    f, body = "memory.csv", []
    for r in rows(f):
        stock = int(r["stock_peak_bytes"])
        body.append([r["stage"], f"{stock / 1e6:.1f} MB", f"{(int(r['checkfree_peak_bytes']) - stock) / 1e6:+.2f} MB",
                     f"{(int(r['plus_peak_bytes']) - stock) / 1e6:+.2f} MB",
                     f"{int(r['checkfree_tensor_bytes']) - int(r['stock_tensor_bytes']):+,d} B",
                     f"{int(r['plus_tensor_bytes']) - int(r['stock_tensor_bytes']):+,d} B ({int(r['plus_extra_params']):,d})"])
    return table(["stage", "stock peak RSS", "CheckFree - stock", "CheckFree+ - stock", "tensor bytes, CheckFree - stock",
                  "CheckFree+ - stock (replica parameters)"], body) + "\n\n" + source(f)


# ------------------------------------------------------------------------------- convergence, GPU
MARKS = (("(within the noise of the fastest)", "≈"), ("(slower)", "slower"), ("(fastest)", "**fastest**"))


def convergence_summary() -> str:
    """The harness's summary across rates; its marks shortened (≈: within 2 Welch SE of the fastest)."""
    t = md_table_rows("convergence.md", "Summary across rates")
    body = []
    for r in t[1:]:
        cells = []
        for c in r:
            for long, short in MARKS:
                c = c.replace(long, short)
            cells.append(c)
        body.append(cells)
    return table(t[0], body) + "\n\n" + source("convergence.md", "convergence_runs.csv", "convergence.csv")


def convergence_noise() -> str:
    t = md_table_rows("convergence_noise.md", "10 % per stage per hour")
    keep = [0, 2, 3, 4, 6, 7]  # strategy, failures, redone, steps, modelled wall, gap
    return table([t[0][i] for i in keep], [[r[i] for i in keep] for r in t[1:]]) + "\n\n" + \
        source("convergence_noise.md", "convergence_noise_runs.csv")


def gpu_check() -> str:
    with open(os.path.join(RESULTS, "gpu_h200_2026-11-27", "gpu_check_run2.txt"), encoding="utf-8") as f:
        lines = [ln for ln in f.read().splitlines() if ln.startswith("|")]
    return "\n".join(lines) + "\n\n" + source("gpu_h200_2026-11-27/gpu_check_run2.txt")


# ------------------------------------------------------------------------------- module map
def _summary(path: str) -> str:
    """A module's docstring, first sentence of its first paragraph (its one-line purpose)."""
    import ast
    with open(path, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or "(no docstring)"
    para = " ".join(doc.split("\n\n")[0].split())
    end = next((i + 1 for i in range(len(para) - 1) if para[i] == "." and para[i + 1] == " "
                and not para[max(0, i - 3):i + 1].endswith(("e.g.", "i.e."))), len(para))
    return para[:end].replace("|", "\\|")


def _package_modules() -> list[str]:
    """The package's modules as a clone will have them: git's tracked files and the new ones not
    yet added (not ignored), so a map written before ``git add`` already names a new module;
    every file outside git."""
    import subprocess
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "ds_checkfree"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        out = [os.path.relpath(os.path.join(root, f), REPO) for root, _, files in os.walk(os.path.join(REPO,
               "ds_checkfree")) for f in files]
    return [f for f in out if f.endswith(".py") and os.path.exists(os.path.join(REPO, f))]


def module_map() -> str:
    """Every module of ds_checkfree/, folder by folder, with the first sentence of its docstring."""
    def order(rel):  # a folder's own __init__ first, its modules, then its sub-folders
        parts = rel.split("/")
        return parts[:-1], parts[-1] != "__init__.py", parts[-1]
    body = []
    for rel in sorted(_package_modules(), key=order):
        shown = os.path.dirname(rel) + "/" if rel.endswith("__init__.py") else rel
        body.append([f"`{shown}`", _summary(os.path.join(REPO, rel))])
    return table(["module", "what it is for (its docstring's first sentence)"], body)


GENERATORS = {f.__name__: f for f in (kill_phases, restart_vs_checkfree, preempt_phases, kill_campaign, heartbeat,
                                       recovery_scaling,
                                       recovery, ablation_4st, ablation_6st, step_time, redundant_step_time, memory,
                                       convergence_summary, convergence_noise, gpu_check, module_map)}
