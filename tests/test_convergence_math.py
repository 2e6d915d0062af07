"""The convergence benchmark's bookkeeping, on synthetic curves with known answers."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from ds_checkfree.config.deepspeed_checks import split_deepspeed_config

from benchmarks import _runs
from benchmarks import convergence as conv
from benchmarks import convergence_projection as proj
from benchmarks import convergence_stats as stats
from benchmarks import convergence_strategies as strategies

Point = stats.Point


def test_time_to_target_interpolates_the_first_crossing():
    xs, ys = [0, 10, 20, 30], [5.0, 4.0, 3.0, 2.0]
    assert stats.time_to_target(xs, ys, 3.5) == pytest.approx(15.0)
    assert stats.time_to_target(xs, ys, 3.0) == pytest.approx(20.0)
    assert stats.time_to_target(xs, ys, 5.5) == 0.0  # already there at the first point
    assert stats.time_to_target(xs, ys, 1.0) is None  # never reached
    # a later rise above the target does not matter: the first crossing counts
    assert stats.time_to_target([0, 10, 20, 30], [4.0, 2.0, 5.0, 1.0], 3.0) == pytest.approx(5.0)


def _synthetic_run():
    """4 steps of 1 s each, a 0.5 s checkpoint save (2 MB) at step 0, validation (0.25 s each)
    after steps 2 and 4, a failure of stage 0 before step 4 that rolls back to step 0 (0.5 s load),
    then steps 1..4 redone; ends at t=109.5 + evals."""
    r, t = [], 100.0
    t += 0.5
    r.append({"event": "checkpoint_save", "step": 0, "stage": None, "time": t, "seconds": 0.5, "bytes": 2_000_000})
    for step in (1, 2, 3):
        t += 1.0
        r.append({"step": step, "loss": 5.0 - step, "step_time_s": 1.0, "time": t})
        if step == 2:
            t += 0.25
            r.append({"step": 2, "val_loss": 3.0, "time": t})
    r.append({"event": "failure", "step": 4, "stage": 0, "time": t, "cause": "schedule_file"})
    t += 0.5
    r.append({"event": "checkpoint_load", "step": 4, "stage": None, "time": t, "seconds": 0.5, "resumed_from": 0,
              "steps_lost": 3})
    for step in (1, 2, 3, 4):
        t += 1.0
        r.append({"step": step, "loss": 5.0 - step, "step_time_s": 1.0, "time": t})
        if step in (2, 4):
            t += 0.25
            r.append({"step": step, "val_loss": 3.0 if step == 2 else 2.0, "time": t})
    return r


def test_wall_clock_curve_charges_storage_and_replacement_and_drops_validation():
    pts, costs = stats.wall_clock_curve(_synthetic_run(), storage_bandwidth_mb_s=1.0, replacement_delay_s=10.0)
    # measured: save 0.5 + 3 steps + load 0.5 + 4 steps = 8.0 s; validation (3 x 0.25 s) excluded
    assert costs.measured_s == pytest.approx(8.0)
    assert costs.eval_excluded_s == pytest.approx(0.75)
    assert costs.charged_storage_s == pytest.approx(4.0)  # 2 MB written + 2 MB read at 1 MB/s
    assert costs.charged_replacement_s == pytest.approx(10.0)
    assert (costs.checkpoint_saves, costs.checkpoint_loads, costs.failures) == (1, 1, 1)
    assert (costs.steps_executed, costs.steps_redone) == (7, 3)
    assert [(p.step, p.steps_executed) for p in pts] == [(2, 2), (2, 5), (4, 7)]
    # first validation: save 0.5 + 2 steps, 2 s of storage charged so far
    assert pts[0].measured_s == pytest.approx(2.5) and pts[0].wall_s == pytest.approx(4.5)
    # after the rollback: 0.5 + 3 + 0.5 + 2 measured; 4 s storage + 10 s replacement charged
    assert pts[1].measured_s == pytest.approx(6.0) and pts[1].wall_s == pytest.approx(20.0)
    assert pts[2].wall_s == pytest.approx(22.0) and pts[2].val_loss == 2.0
    # without a bandwidth nothing is charged for storage
    _, free = stats.wall_clock_curve(_synthetic_run())
    assert free.charged_storage_s == 0.0 and free.charged_replacement_s == 0.0


def _curve(walls, losses):
    return [Point(step=10 * (i + 1), steps_executed=10 * (i + 1), wall_s=w, val_loss=y, measured_s=w, charged_s=0.0)
            for i, (w, y) in enumerate(zip(walls, losses))]


def test_outcomes_reached_or_censored_at_the_cut_off():
    pts = _curve([10, 20, 40, 60], [4.0, 3.0, 2.0, 1.0])
    steps, wall = stats.run_outcomes(pts, stats.Costs(steps_executed=40, measured_s=60.0), target=2.5)
    assert (steps.value, steps.reached) == (pytest.approx(25.0), True) and wall.value == pytest.approx(30.0)
    # never reached: censored at the steps executed and the wall-clock used
    steps, wall = stats.run_outcomes(pts, stats.Costs(steps_executed=41, measured_s=61.0), target=0.5)
    assert (steps.value, steps.reached, wall.value, wall.reached) == (41.0, False, 61.0, False)


def test_modelled_wall_clock_from_steps_ratio_and_charged_costs():
    pts = [Point(10, 10, 5.0, 3.0, 4.0, 1.0), Point(20, 20, 9.0, 2.0, 7.0, 2.0), Point(30, 30, 12.0, 1.0, 9.0, 3.0)]
    assert stats.charged_at_target(pts, 2.5) == 2.0  # the first validation at or below the target
    assert stats.charged_at_target(pts, 0.5) == 3.0  # never reached: everything charged
    got = stats.modelled_wall(stats.Outcome(15.0, True), step_s=0.2, step_ratio=1.5, charged_s=2.0)
    assert got.value == pytest.approx(15 * 0.2 * 1.5 + 2.0) and got.reached
    assert not stats.modelled_wall(stats.Outcome(30.0, False), 0.2, 1.0, 0.0).reached


def test_summary_formats_mean_sd_and_censoring():
    O = stats.Outcome
    s = stats.summarize_outcomes([O(100, True), O(120, True), O(110, True)])
    assert (s.n, s.reached, s.mean, s.sd) == (3, 3, 110.0, pytest.approx(10.0))
    assert stats.fmt_summary(s) == "110 ± 10"
    none = stats.summarize_outcomes([O(300, False), O(310, False)])
    assert stats.fmt_summary(none) == ">300"  # a cut-off, never "never"
    some = stats.summarize_outcomes([O(100, True), O(300, False)])
    assert stats.fmt_summary(some) == "≥200 (1/2 reached; rest >300)"
    assert stats.summarize_outcomes([]) is None and stats.fmt_summary(None) == "n/a"
    assert stats.fmt_summary(stats.summarize_outcomes([O(80, True)])) == "80 (n=1)"


def test_gap_inside_or_outside_the_noise():
    S = stats.Summary
    a, b = S(4, 4, 110.0, 10.0, None), S(4, 4, 100.0, 10.0, None)
    diff, band, inside = stats.gap_vs(a, b)
    assert diff == 10.0 and band == pytest.approx(2 * (200 / 4) ** 0.5) and inside  # 10 <= 14.1
    diff, band, inside = stats.gap_vs(S(4, 4, 130.0, 10.0, None), b)
    assert not inside
    assert stats.gap_vs(S(2, 1, 200.0, 1.0, 300.0), b) is None  # a censored cell has no measured gap
    assert stats.gap_vs(S(1, 1, 200.0, 0.0, None), b) is None  # nor has a single run
    # a systematic error (a measured step-time ratio's CI) widens the band and does not shrink with n
    _, band, inside = stats.gap_vs(S(4, 4, 130.0, 0.0, None), S(4, 4, 100.0, 0.0, None), sys_a=10.0, sys_b=10.0)
    assert band == pytest.approx(2 * 200 ** 0.5) and not inside


def test_extra_steps_per_failure_is_a_mean_over_runs():
    # 2 failures -> +20 steps (10 per failure), 4 failures -> +80 steps (20 per failure)
    mean, sd = stats.extra_steps_per_failure([(120, 2), (180, 4), (90, 0)], 100.0)
    assert mean == pytest.approx(15.0) and sd == pytest.approx(50 ** 0.5)
    assert stats.extra_steps_per_failure([(100, 0)], 100.0) is None


def test_projection_models():
    # the paper's 500M pair at 10 %/h: p 0.002 means a step of ~68 s
    assert proj.implied_step_seconds(0.002, 10.0) == pytest.approx(3600 * math.log(0.998) / math.log(0.9))
    kw = dict(ref_steps=1000, step_s=10.0, stages=5, p=0.001, save_s=4.0, load_s=4.0)
    exact = proj.project("exact", step_ratio=1.2, **kw)
    assert exact["abs"] == pytest.approx(1000 * 10 * 1.2) and exact["failures"] == pytest.approx(5.0)
    rb = proj.project("rollback", step_ratio=1.0, interval=20, **kw)
    steps = 1000 / (1 - 0.005 * 10)  # every failure redoes k/2 = 10 steps, redone steps fail too
    assert rb["steps"] == pytest.approx(steps)
    assert rb["abs"] == pytest.approx(steps * 10 + steps / 20 * 4 + 0.005 * steps * 4)
    # Young's interval: sqrt(2 C / lambda) with lambda = 0.005 / 10 s -> 126.5 s -> 13 steps
    assert proj.young_interval(4.0, 10.0, 0.005) == 13
    cf = proj.project("convergence", step_ratio=1.0, extra_per_failure=(3.0, 1.0), **kw)
    assert cf["steps_abs"] == pytest.approx(1000 + 3 * 5) and cf["steps_rel"] == pytest.approx(1000 + 4 * 5)
    assert cf["abs"] == pytest.approx(1015 * 10)
    assert proj.project("convergence", step_ratio=1.0, extra_per_failure=None, **kw)["abs"] is None


def test_default_target_is_the_reference_loss_at_80_percent():
    pts = _curve([1, 2, 3, 4, 5, 6], [6.0, 5.0, 4.0, 3.0, 2.5, 2.0])  # steps 10..60
    assert stats.default_target(pts, 0.8) == 2.5  # first validation at or after step 48: step 50
    assert stats.speedup(50.0, 40.0) == pytest.approx(1.25)
    assert stats.speedup(None, 40.0) is None and stats.speedup(50.0, None) is None


def test_every_available_strategy_config_is_valid(tmp_path):
    sched = tmp_path / "f.json"
    sched.write_text(json.dumps({"num_stages": 4, "failures": [{"step": 3, "stage": 1}]}))
    a = SimpleNamespace(storage_bandwidth_mb_s=100.0)
    registry = strategies.strategy_registry([5, 20], 20)
    names = [s.name for s in strategies.select_strategies(registry, ["checkfree", "checkpoint", "redundant"])]
    assert names == ["no_failure", "checkfree", "checkpoint_5", "checkpoint_20", "redundant"]
    assert [s.name for s in strategies.select_strategies(registry, ["all"])] == [s.name for s in registry]
    with pytest.raises(SystemExit, match="unknown"):
        strategies.select_strategies(registry, ["nope"])
    got = {}
    for st in registry:
        if not st.available():
            assert st.requires  # only strategies waiting for a config key may be unavailable
            continue
        cfg = strategies.strategy_config(st, a, None if st.name == "no_failure" else str(sched), str(tmp_path / st.name))
        _, cf = split_deepspeed_config(cfg)
        got[st.name] = (cf.mode, cf.num_stages, cf.checkpoint_every, cf.failure_schedule is not None)
    assert got["no_failure"] == ("off", 4, 0, False)
    assert got["checkfree"] == ("checkfree", 4, 20, True)
    assert got["checkfree_plus"] == ("checkfree_plus", 4, 0, True)
    assert got["checkfree_plus_6"] == ("checkfree_plus", 6, 0, True)
    assert got["checkpoint_5"] == ("off", 4, 5, True)
    assert got["redundant"] == ("redundant", 4, 0, True) and got["redundant_lb"] == ("redundant", 4, 0, True)
    if "ckpt_stage_5" in got:
        assert got["ckpt_stage_5"] == ("off", 4, 5, True)


def test_progress_counts_every_run_and_estimates_from_launched_ones_only():
    p = conv.Progress(4)
    assert p.tick(None) == "[1/4]"  # a reused run: no estimate yet
    assert p.tick(120.0) == "[2/4, ~4 min left if the rest run]"  # 2 left x 120 s
    assert p.tick(60.0) == "[3/4, ~2 min left if the rest run]"  # 1 left x mean 90 s
    assert p.tick(None) == "[4/4]"


def test_cuda_runs_share_gpu_0_through_the_rank_wrapper():
    cuda = _runs.launch_cmd(6, "cuda")
    assert cuda[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "6"]
    assert cuda[6] == "--no-python" and cuda[7].endswith("scripts/one_gpu_rank.sh") and cuda[-1].endswith("train.py")
    assert Path(cuda[7]).exists()
    cpu = _runs.launch_cmd(4, "cpu")
    assert "--num_gpus" in cpu and cpu[cpu.index("--num_gpus") + 1] == "4" and cpu[-1].endswith("train.py")
    with pytest.raises(ValueError, match="choose cpu or cuda"):
        _runs.launch_cmd(4, "tpu")
    assert conv.parse_args(["--accelerator", "cuda"]).accelerator == "cuda"


def test_the_run_cache_sits_beside_the_outputs():
    results = conv.RESULTS
    assert conv.output_paths(False, "cpu", None, None) == (f"{results}/convergence", f"{results}/convergence_runs")
    assert conv.output_paths(True, "cuda", None, None) == (f"{results}/convergence_quick_cuda",
                                                           f"{results}/convergence_quick_cuda_runs")
    assert conv.output_paths(True, "cpu", "/x/noise", None) == ("/x/noise", "/x/noise_runs")
    assert conv.output_paths(True, "cpu", "/x/noise", "/y/cache") == ("/x/noise", "/y/cache")
    # a relative cache is made absolute: run specs name paths inside it (checkpoint dirs), so the same
    # cache must match from any working directory
    assert conv.output_paths(True, "cpu", None, "rel/cache")[1] == os.path.abspath("rel/cache")


def test_report_only_and_rerun_are_refused_together(capsys):
    with pytest.raises(SystemExit):
        conv.parse_args(["--report_only", "--rerun"])
    assert "contradict" in capsys.readouterr().err


def test_report_only_launches_nothing_and_names_the_missing_runs(tmp_path):
    """An empty cache under --report_only: no run directory (only the failure schedules), and a markdown that
    says every run is missing (the partial report of a long run in progress)."""
    prefix = tmp_path / "q"
    assert conv.main(["--quick", "--report_only", "--target_loss", "3.0", "--strategies", "checkfree", "redundant",
                      "--out", str(prefix)]) == 0
    assert sorted(p.name for p in (tmp_path / "q_runs").iterdir()) == ["failures_rate10_S4_f0.json",
                                                                        "failures_rate10_S4_f1.json"]
    md = (tmp_path / "q.md").read_text()
    assert "Partial report (--report_only)**: 5 runs are not in the cache" in md
    assert "checkfree rate 10 schedule 1 seed 0" in md and "no_failure rate 0 schedule 0 seed 0" in md


def test_report_sets_unrecoverable_runs_apart_from_slow_ones(tmp_path):
    """Three CheckFree runs: two reach the target (at 100 and 120 executed steps), one stops at step 60
    (an unrecoverable loss). The cell is censored (a lower bound), and the two that recovered are
    summarised apart; the stop's reason is printed under the table."""
    from benchmarks import convergence_report as report
    a = conv.parse_args(["--quick", "--strategies", "checkfree", "--out", str(tmp_path / "r")])
    chosen = strategies.select_strategies(strategies.strategy_registry([5], 20), ["checkfree"])

    def run(last, state, reason=None):  # a run that stopped never gets below 2.5; the others reach 2.0 at `last`
        pts = [Point(s, s, s * 0.1, 3.0 - s / (last if state != "stopped" else 2 * last), s * 0.1, 0.0)
               for s in range(20, last + 1, 20)]
        costs = stats.Costs(steps_executed=pts[-1].step, failures=1, recoveries=1)
        return {"points": pts, "costs": costs, "status": {"state": state, **({"reason": reason} if reason else {})},
                "step_s": 0.1}
    runs = {("no_failure", 0.0, 0, 0): run(100, "finished"),
            ("checkfree", 10.0, 0, 0): run(100, "reached target"),
            ("checkfree", 10.0, 1, 0): run(120, "reached target"),
            ("checkfree", 10.0, 2, 0): run(60, "stopped", "cannot recover lost stages [1, 2]")}
    text = report.write_outputs(a, chosen, [], [10.0], runs, 2.0, {0: 2.0}, {10.0: {}}, {10.0: 0.026},
                                str(tmp_path / "r"), 1.0, {"stock": (1.0, 1.0, 1.0)})
    summary, row = [line for line in text.splitlines() if line.startswith("| CheckFree, all stages fail")]
    assert summary.endswith("| ≥93 (2/3 reached; rest >60) / ≥9.3 (2/3 reached; rest >6.0) [1 unrecoverable] |")
    assert "≥" in row and "(2/3 reached; rest >60)" in row
    assert "1 unrecoverable, the 2 that recovered: 110 ± 14" in row
    assert "checkfree (schedule 2, seed 0) stopped: cannot recover lost stages [1, 2]" in text
    assert (tmp_path / "r.md").read_text().strip() == text.strip()
