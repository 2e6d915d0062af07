"""The labelled projection of the convergence results to the paper's model sizes: a model, not a
measurement; every input is printed next to it."""
from __future__ import annotations

import math
import statistics

from benchmarks.convergence_stats import extra_steps_per_failure
from benchmarks.convergence_strategies import NO_FAILURE

#: nominal parameter counts and failing (block) stages of the paper's models; per-iteration
#: failure probabilities hard-coded in the reference code (gensyn-ai/CheckFree), with the %/h they label
PAPER_MODELS = {"124M": (124e6, 4), "500M": (500e6, 6), "1.5B": (1.5e9, 6)}
PAPER_PROBABILITIES = {"124M": [(10.0, 0.0006), (16.0, 0.001)],
                       "500M": [(5.0, 0.0009), (10.0, 0.002), (16.0, 0.004)],
                       "1.5B": [(10.0, 0.004), (16.0, 0.008)]}
#: checkpoint bytes per parameter: bf16 weights (2) + fp32 master weights (4) + Adam moments (2 x 4)
CKPT_BYTES_PER_PARAM = 14


def implied_step_seconds(p: float, rate_percent_per_hour: float) -> float:
    """The step time at which a per-step probability ``p`` is ``rate`` %/h (the paper's pairs)."""
    return 3600.0 * math.log(1.0 - p) / math.log(1.0 - rate_percent_per_hour / 100.0)


def young_interval(save_s: float, step_s: float, failures_per_step: float) -> int:
    """Young's optimal checkpoint interval in steps, sqrt(2 C / lambda) with lambda per second."""
    if failures_per_step <= 0:
        return 10 ** 9
    lam = failures_per_step / step_s
    return max(1, round(math.sqrt(2.0 * save_s / lam) / step_s))


def project(kind: str, *, ref_steps: float, step_s: float, step_ratio: float, stages: int, p: float,
            save_s: float, load_s: float, interval: int | None = None,
            extra_per_failure: tuple[float, float] | None = None) -> dict:
    """Projected wall-clock to the target for one strategy at one paper size and rate.

    Expected failures F = stages * p * steps. ``rollback``: every failure redoes on average
    interval/2 steps and reloads (``load_s``); saves every ``interval`` steps (``save_s``).
    ``exact``: no extra steps (exact restore). ``convergence``: extra steps per failure from
    our runs (mean, sd): every failure costs that many steps; returned at the mean (``abs``)
    and at mean + 1 sd (``rel``, the pessimistic end). Step time = ``step_s * step_ratio``;
    ``stage`` reload charges ``load_s`` per failure on top."""
    f_rate = stages * p
    out = {"failures": f_rate * ref_steps}
    if kind == "rollback":
        k = interval or young_interval(save_s, step_s, f_rate)
        # redone steps also fail: steps solve S = ref + f_rate * S * k / 2
        denom = 1.0 - f_rate * k / 2.0
        steps = ref_steps / denom if denom > 0 else math.inf
        fails = f_rate * steps
        t = steps * step_s * step_ratio + (steps / k) * save_s + fails * load_s
        out.update(interval=k, steps=steps, failures=fails, abs=t, rel=t)
        return out
    if kind in ("exact", "reference"):
        t = ref_steps * step_s * step_ratio
        out.update(steps=ref_steps, abs=t, rel=t)
        return out
    if extra_per_failure is None:
        out.update(steps=None, abs=None, rel=None)
        return out
    mean, sd = extra_per_failure
    fails = f_rate * ref_steps
    saves = (ref_steps / interval) * save_s if interval else 0.0
    reload = fails * load_s if kind == "stage" else 0.0
    s_abs = ref_steps + mean * fails
    s_rel = ref_steps + (mean + sd) * fails
    out.update(steps_abs=s_abs, steps_rel=s_rel,
               abs=s_abs * step_s * step_ratio + saves + reload if s_abs > 0 else None,
               rel=s_rel * step_s * step_ratio + saves + reload if s_rel > 0 else None)
    return out



def _fmt(x, digits=1, suffix=""):
    return "n/a" if x is None else f"{x:.{digits}f}{suffix}"



def projection_section(a, strategies, outcomes, ratios) -> list[str]:
    ref_runs = [v[0] for k, v in outcomes.items() if k[0] == NO_FAILURE]
    ref_steps_ours = statistics.fmean(o.value for o in ref_runs) if ref_runs else None
    L = ["## Projection to the paper's sizes (a model, not a measurement)", "",
         "Inputs, every one printed: reference iterations to target N_ref = "
         f"{a.projection_ref_steps:,} (a stand-in: the reference code's ablation length, not measured); step time T = "
         "the step time the paper's own (p, %/h) pair implies, T = 3600 ln(1-p) / ln(1-h); checkpoint bytes = "
         f"{CKPT_BYTES_PER_PARAM} B/parameter (bf16 weights 2 + fp32 masters 4 + Adam moments 8) / stages per "
         f"node, written and read at {a.projection_bandwidth_gb_s:g} GB/s per node, all stages in parallel; "
         "expected failures F = stages x p x steps; step-time ratios vs stock measured here by "
         f"`benchmarks/step_time.py` ({a.step_time_csv}, 4 stages tiny model): "
         + ", ".join(f"{k} {v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for k, v in ratios.items()) + ".", "",
         "Per strategy: checkpoint rollback: Young's interval k = sqrt(2 C_save / lambda), every failure redoes k/2 "
         "steps (redone steps fail too) and reloads; redundant: no extra steps (exact restore), its measured step "
         "ratio; CheckFree/CheckFree+ (and stage-only reload): extra steps per failure from our runs (each run's "
         "steps-to-target minus the reference's mean, divided by the failures it saw; mean and sd over runs; "
         "censored runs count at their cut-off, a lower bound), applied as a fixed number of steps per failure "
         "at the paper's failure count, at the mean and at mean + 1 sd. **Assumption that carries the "
         "projection**: a failure costs a 0.1-1.5B model the same number of steps it costs our tiny model; nothing "
         "here tests it. Replacement-node time is the same for every strategy and left out.", ""]
    if ref_steps_ours is None:
        return L + ["(no reference run: no projection)", ""]
    per_failure = {}
    for st in strategies:
        if st.recovery not in ("convergence", "stage"):
            continue
        runs = [(o[0].value, o[2]) for k, o in outcomes.items() if k[0] == st.name and o[2] > 0]
        cens = sum(1 for k, o in outcomes.items() if k[0] == st.name and o[2] > 0 and not o[0].reached)
        e = extra_steps_per_failure(runs, ref_steps_ours)
        if e is not None:
            per_failure[st.name] = (e, len(runs), cens)
    L += [f"| strategy | runs with failures | extra steps per failure, mean ± sd (reference {ref_steps_ours:.0f} "
          "steps) |", "|---|---|---|"]
    for name, (e, n, cens) in per_failure.items():
        L.append(f"| {name} | {n}{f' ({cens} censored: lower bound)' if cens else ''} | {e[0]:+.2f} ± {e[1]:.2f} |")
    L += ["", "| size | stages | %/h | p (paper) | T s (implied) | ckpt GB/node | save s | strategy | step ratio | "
          "steps (mean / +1 sd) | failures | hours to target (mean / +1 sd) |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for size, (nparams, stages) in PAPER_MODELS.items():
        ckpt = nparams * CKPT_BYTES_PER_PARAM / stages
        save_s = ckpt / (a.projection_bandwidth_gb_s * 1e9)
        for h, p in PAPER_PROBABILITIES[size]:
            T = implied_step_seconds(p, h)
            for st in strategies:
                if st.recovery == "reference":
                    continue
                kind = st.recovery if st.recovery != "convergence" or not st.name.startswith("ckpt_stage") else "stage"
                ratio = ratios.get(st.step_variant, (1.0, 1.0, 1.0))[0]
                e = per_failure.get(st.name, (None,))[0]
                pr = project(kind, ref_steps=a.projection_ref_steps, step_s=T, step_ratio=ratio, stages=stages, p=p,
                             save_s=save_s, load_s=save_s, interval=None if kind == "rollback" else
                             (st.checkpoint_every or None), extra_per_failure=e)
                if kind == "rollback" and st.name != f"checkpoint_{a.checkpoint_every[0]}":
                    continue  # one row: Young's interval does not depend on our intervals
                name = "checkpoint (Young's k={}), global rollback".format(pr.get("interval")) \
                    if kind == "rollback" else st.name
                steps = (f"{pr['steps']:,.0f}" if pr.get("steps") is not None else
                         f"{_fmt(pr.get('steps_abs'), 0)} / {_fmt(pr.get('steps_rel'), 0)}")
                hours = (f"{pr['abs'] / 3600:.1f}" if kind in ("rollback", "exact") and pr["abs"] is not None else
                         f"{_fmt(pr['abs'] and pr['abs'] / 3600)} / {_fmt(pr['rel'] and pr['rel'] / 3600)}")
                L.append(f"| {size} | {stages} | {h:g} | {p} | {T:.1f} | {ckpt / 1e9:.2f} | {save_s:.2f} | {name} | "
                         f"{ratio:.3f} | {steps} | {pr['failures']:.1f} | {hours} |")
    L.append("")
    return L

