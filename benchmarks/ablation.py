"""Recovery-method ablation: validation loss after losing an intermediate stage mid-training.

Stage 1 of 4 (``--num_stages``) is lost at the start of step K (``--fail_step``) and rebuilt with each
``recovery_method`` (weighted_average = the paper's rule, mean, copy_prev = copy the
previous stage, random = re-initialise), against the same run with no failure. Same seed,
data order and initial weights for every method, so the runs are identical up to step K-1
(checked and printed). Default data: the embedded corpus (Shakespeare); ``--data
python-docs`` is a second, built-in one of another kind: the Python reference documentation
that ships with the interpreter (``pydoc_data.topics``, ~465k characters of technical prose,
written once to the runs folder). ``--clip_scope stage`` clips each stage's own gradient at
``gradient_clipping`` as the paper's reference code does (default: DeepSpeed's global norm);
the neighbour weights of the weighted average depend on it.

    python -m benchmarks.ablation                         # tiny, 1 seed: 5 runs, ~5 min on 2 cores
    python -m benchmarks.ablation --seeds 0 1 2           # mean ± std over seeds
    python -m benchmarks.ablation --num_stages 6 --num_layers 12 --clip_scope stage --seeds 0 1 2 \
        --data python-docs --out benchmarks/results/ablation_6st_stage_pydocs

Finished runs are kept under ``--runs_dir`` and reused (``--rerun`` to redo them), so seeds
can be run in separate invocations and aggregated afterwards. Writes
``benchmarks/results/ablation.csv`` (one row per method and seed) and ``ablation.png``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time

from benchmarks._runs import RESULTS, add_failure_run_args, base_config, mean_sd, run_train
from ds_checkfree.testing import read_metrics, split

METHODS = ("weighted_average", "mean", "copy_prev", "random")
NONE = "no_failure"
#: ``--data`` value of the built-in second corpus
PYTHON_DOCS = "python-docs"


def python_docs_corpus(directory: str) -> str:
    """Write the interpreter's reference documentation (``pydoc_data.topics``) as one text
    file under ``directory`` and return its path: a second corpus that needs no download."""
    import platform

    import pydoc_data.topics as topics
    path = os.path.join(directory, f"python_docs_{platform.python_version()}.txt")
    if not os.path.exists(path):
        os.makedirs(directory, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n\n".join(topics.topics[k] for k in sorted(topics.topics)))
    return path


def complete(out: str, steps: int) -> bool:
    try:
        recs = read_metrics(out)
    except (OSError, ValueError):
        return False
    return any(r.get("val_loss") is not None and r["step"] == steps for r in recs)


def val_at(vals: dict[int, float], step: int) -> tuple[int, float]:
    """First validation at or after ``step``."""
    later = sorted(s for s in vals if s >= step)
    return (later[0], vals[later[0]]) if later else (step, float("nan"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_failure_run_args(p, steps=120, fail_step=60)
    p.add_argument("--num_stages", type=int, default=4, help="pipeline stages (= processes)")
    p.add_argument("--clip_scope", choices=("global", "stage"), default="global",
                   help="checkfree.clip_scope: DeepSpeed's global norm, or each stage's own (the reference code)")
    p.add_argument("--eval_every", type=int, default=10)
    p.add_argument("--eval_batches", type=int, default=8)
    p.add_argument("--after", type=int, nargs="+", default=[0, 10, 30],
                   help="report val loss at the first validation >= fail_step + each offset")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--data", default=None, help="passed to train.py --data (default: embedded corpus); "
                   f"{PYTHON_DOCS!r}: the built-in second corpus")
    p.add_argument("--runs_dir", default=os.path.join(RESULTS, "ablation_runs"))
    p.add_argument("--rerun", action="store_true", help="ignore finished runs in --runs_dir")
    p.add_argument("--out", default=os.path.join(RESULTS, "ablation"), help="prefix of the .csv and .png")
    p.add_argument("--timeout_s", type=float, default=1200)
    a = p.parse_args(argv)
    if not 1 < a.fail_step <= a.steps:
        p.error("--fail_step must be in 2..--steps")
    if not 0 < a.fail_stage < a.num_stages - 1:
        p.error(f"--fail_stage must be an intermediate stage (1..{a.num_stages - 2}): the methods compared are "
                "plain CheckFree's, which has no rule for the edges")
    data_label = a.data
    if a.data == PYTHON_DOCS:
        a.data = python_docs_corpus(a.runs_dir)

    tag = f"{a.model}{'_L' + str(a.num_layers) if a.num_layers else ''}{'_T' + str(a.seq_len) if a.seq_len else ''}" \
          f"_steps{a.steps}_fail{a.fail_stage}at{a.fail_step}_ev{a.eval_every}x{a.eval_batches}" \
          f"{'_' + os.path.basename(a.data.rstrip('/')) if a.data else ''}" \
          f"{'_S' + str(a.num_stages) if a.num_stages != 4 else ''}{'_clipstage' if a.clip_scope == 'stage' else ''}"
    methods = [NONE] + [m for m in a.methods if m != NONE]
    t_start, ran = time.time(), 0
    results: dict[tuple[str, int], list[dict]] = {}
    for seed in a.seeds:
        for method in methods:
            out = os.path.join(a.runs_dir, tag, f"{method}_seed{seed}")
            if not a.rerun and complete(out, a.steps):
                results[(method, seed)] = read_metrics(out)
                continue
            cfg = base_config("checkfree", recovery_method=method if method != NONE else "weighted_average",
                              num_stages=a.num_stages)
            if a.clip_scope != "global":
                cfg["checkfree"]["clip_scope"] = a.clip_scope
            extra = ["--seed", seed, "--eval_every", a.eval_every, "--eval_batches", a.eval_batches]
            if method != NONE:
                extra += ["--fail_at", f"{a.fail_stage}:{a.fail_step}"]
            for flag in ("num_layers", "seq_len", "data"):
                if getattr(a, flag):
                    extra += [f"--{flag}", getattr(a, flag)]
            print(f"[{method} seed {seed}]", flush=True)
            results[(method, seed)] = run_train(cfg, out, steps=a.steps, model=a.model, num_gpus=a.num_stages,
                                                extra_args=extra, timeout_s=a.timeout_s)
            ran += 1

    # ---- analysis
    rows, curves, losses = [], {}, {}
    for (method, seed), recs in results.items():
        steps, vals, events = split(recs)
        v = {r["step"]: r["val_loss"] for r in vals}
        curves[(method, seed)] = v
        losses[(method, seed)] = {r["step"]: r["loss"] for r in steps}
        row = {"method": method, "seed": seed}
        for off in a.after:
            s, val = val_at(v, a.fail_step + off)
            row[f"val@K+{off}"], row[f"step@K+{off}"] = val, s
        row["val_end"] = v.get(a.steps, float("nan"))
        row["loss@K"] = losses[(method, seed)].get(a.fail_step, float("nan"))
        rec = next((e for e in events if e["event"] == "recovery"), None)
        row["weights"] = json.dumps([round(w, 4) for w in rec["weights"]]) if rec else ""
        rows.append(row)
    by = {(r["method"], r["seed"]): r for r in rows}
    for r in rows:
        base = by.get((NONE, r["seed"]))
        for key in [f"val@K+{o}" for o in a.after] + ["val_end"]:
            r["gap_" + key] = r[key] - base[key] if base else float("nan")

    # pre-failure sanity: every run identical to the no-failure run before step K
    dev = 0.0
    for (method, seed), v in curves.items():
        ref = curves.get((NONE, seed), {})
        for s, val in v.items():
            if s < a.fail_step and s in ref:
                dev = max(dev, abs(val - ref[s]))

    shape = a.model + (f", {a.num_layers} layers" if a.num_layers else "") + (f", seq {a.seq_len}" if a.seq_len else "")
    print(f"\n## Ablation: stage {a.fail_stage} of {a.num_stages} lost at step K={a.fail_step} of {a.steps} ({shape}, "
          f"{data_label or 'embedded corpus'}, {a.clip_scope} clipping, seeds {a.seeds}, val every {a.eval_every} "
          f"steps on {a.eval_batches} micro-batches; mean ± std over seeds)\n")
    steps_for = {o: by[(NONE, a.seeds[0])][f"step@K+{o}"] for o in a.after}
    cols = [(f"train loss @{a.fail_step}", "loss@K")] + \
           [(f"val @{steps_for[o]}", f"val@K+{o}") for o in a.after] + [(f"val @{a.steps} (end)", "val_end")] + \
           [(f"gap @{steps_for[o]}", f"gap_val@K+{o}") for o in a.after] + [("gap @end", "gap_val_end")]
    print("| method | " + " | ".join(c[0] for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for m in methods:
        rs = [by[(m, s)] for s in a.seeds]
        print(f"| {m} | " + " | ".join(mean_sd([r[k] for r in rs]) for _, k in cols) + " |")
    print(f"\nPre-failure check: max |val loss - no_failure| before step {a.fail_step}: {dev:.2e}")
    failed = [m for m in methods if m != NONE]
    for label, key in ([(f"right after (val @{steps_for[a.after[0]]})", f"val@K+{a.after[0]}")] +
                       [("at the end", "val_end")]):
        order = sorted(failed, key=lambda m: statistics.mean(by[(m, s)][key] for s in a.seeds))
        print(f"Ordering {label}, best first: " + " < ".join(order))
    end_order = sorted(failed, key=lambda m: statistics.mean(by[(m, s)]["val_end"] for s in a.seeds))
    if set(("weighted_average", "random")) <= set(failed):
        wa_best, rnd_worst = end_order[0] == "weighted_average", end_order[-1] == "random"
        print(f"Paper's expectation (weighted_average best, random worst) at the end: weighted_average best: "
              f"{'yes' if wa_best else 'no'}; random worst: {'yes' if rnd_worst else 'no'}")
    print(f"Runs: {ran} launched now, {len(results) - ran} reused from {os.path.join(a.runs_dir, tag)}; "
          f"wall time {time.time() - t_start:.0f} s")

    # ---- CSV
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    fields = ["method", "seed", "loss@K"] + [k for o in a.after for k in (f"step@K+{o}", f"val@K+{o}")] + \
             ["val_end"] + [f"gap_val@K+{o}" for o in a.after] + ["gap_val_end", "weights"]
    with open(a.out + ".csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["model", "stages", "data", "clip_scope", "steps", "fail_step",
                                          "fail_stage"] + fields,
                           extrasaction="ignore")
        w.writeheader()
        for m in methods:
            for s in a.seeds:
                w.writerow({**by[(m, s)], "model": shape, "stages": a.num_stages, "data": data_label or "shakespeare",
                            "clip_scope": a.clip_scope, "steps": a.steps, "fail_step": a.fail_step,
                            "fail_stage": a.fail_stage})
    print(f"CSV: {a.out}.csv")

    # ---- plot
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in methods:
        for ax, data, kind in ((ax1, curves, "val"), (ax2, losses, "train")):
            common = sorted(set.intersection(*[set(data[(m, s)]) for s in a.seeds]))
            if kind == "train":
                common = [s for s in common if s >= a.fail_step - 10]
            mean = [statistics.mean(data[(m, s)][t] for s in a.seeds) for t in common]
            line, = ax.plot(common, mean, label=m, marker="o" if kind == "val" else None, ms=3,
                            ls="--" if m == NONE else "-")
            if len(a.seeds) > 1:
                sd = [statistics.stdev(data[(m, s)][t] for s in a.seeds) for t in common]
                ax.fill_between(common, [x - y for x, y in zip(mean, sd)], [x + y for x, y in zip(mean, sd)],
                                color=line.get_color(), alpha=0.15)
    for ax, title in ((ax1, "validation loss"), (ax2, "training loss around the failure")):
        ax.axvline(a.fail_step, color="k", ls=":", lw=1, label=f"stage {a.fail_stage} lost")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax1.legend()
    fig.suptitle(f"Recovery ablation ({shape}, {a.num_stages} stages, {data_label or 'shakespeare'}, "
                 f"{a.clip_scope} clipping, seeds {a.seeds})")
    fig.tight_layout()
    fig.savefig(a.out + ".png", dpi=120)
    print(f"Plot: {a.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
