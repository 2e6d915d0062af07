"""The convergence benchmark's bookkeeping, on synthetic curves with known answers."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ds_checkfree.deepspeed_config import split_deepspeed_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
_spec = importlib.util.spec_from_file_location("convergence", ROOT / "benchmarks" / "convergence.py")
conv = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("convergence", conv)  # dataclasses look their module up by name
_spec.loader.exec_module(conv)
Point = conv.Point


def test_time_to_target_interpolates_the_first_crossing():
    xs, ys = [0, 10, 20, 30], [5.0, 4.0, 3.0, 2.0]
    assert conv.time_to_target(xs, ys, 3.5) == pytest.approx(15.0)
    assert conv.time_to_target(xs, ys, 3.0) == pytest.approx(20.0)
    assert conv.time_to_target(xs, ys, 5.5) == 0.0  # already there at the first point
    assert conv.time_to_target(xs, ys, 1.0) is None  # never reached
    # a later rise above the target does not matter: the first crossing counts
    assert conv.time_to_target([0, 10, 20, 30], [4.0, 2.0, 5.0, 1.0], 3.0) == pytest.approx(5.0)


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
    pts, costs = conv.wall_clock_curve(_synthetic_run(), storage_bandwidth_mb_s=1.0, replacement_delay_s=10.0)
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
    _, free = conv.wall_clock_curve(_synthetic_run())
    assert free.charged_storage_s == 0.0 and free.charged_replacement_s == 0.0


def _curve(walls, losses):
    return [Point(step=10 * (i + 1), steps_executed=10 * (i + 1), wall_s=w, val_loss=y, measured_s=w, charged_s=0.0)
            for i, (w, y) in enumerate(zip(walls, losses))]


def test_summarize_speedups_against_the_fastest_checkpoint_and_redundant():
    losses = [4.0, 3.0, 2.0, 1.0]
    curves = {
        ("checkpoint_5", 10.0): _curve([10, 20, 40, 60], losses),     # reaches 2.0 at 40 s
        ("checkpoint_20", 10.0): _curve([15, 30, 50, 70], losses),    # 50 s
        ("redundant", 10.0): _curve([8, 16, 30, 45], losses),         # 30 s
        ("checkfree", 10.0): _curve([6, 12, 24, 36], losses),         # 24 s
        ("checkfree_plus", 10.0): _curve([6, 12, 24, 36], [4.0, 3.0, 2.5, 2.4]),  # never
    }
    got = {r.strategy: r for r in conv.summarize(curves, target=2.0)}
    assert got["checkfree"].wall_s == pytest.approx(24.0) and got["checkfree"].steps == pytest.approx(30.0)
    assert got["checkfree"].best_checkpoint == "checkpoint_5"
    assert got["checkfree"].vs_checkpoint == pytest.approx(40 / 24)
    assert got["checkfree"].vs_redundant == pytest.approx(30 / 24)
    assert got["checkpoint_5"].vs_checkpoint == pytest.approx(1.0)
    assert got["checkpoint_20"].vs_checkpoint == pytest.approx(40 / 50)
    assert got["redundant"].vs_checkpoint == pytest.approx(40 / 30)
    assert got["checkfree_plus"].wall_s is None and got["checkfree_plus"].vs_checkpoint is None
    assert got["checkfree_plus"].final_loss == 2.4
    # interpolated target between points: 2.5 lies halfway between 20 s and 40 s for checkpoint_5
    assert {r.strategy: r.wall_s for r in conv.summarize(curves, 2.5)}["checkpoint_5"] == pytest.approx(30.0)


def test_default_target_is_the_reference_loss_at_80_percent():
    pts = _curve([1, 2, 3, 4, 5, 6], [6.0, 5.0, 4.0, 3.0, 2.5, 2.0])  # steps 10..60
    assert conv.default_target(pts, 0.8) == 2.5  # first validation at or after step 48: step 50
    assert conv.speedup(50.0, 40.0) == pytest.approx(1.25)
    assert conv.speedup(None, 40.0) is None and conv.speedup(50.0, None) is None


def test_every_strategy_config_is_valid(tmp_path):
    sched = tmp_path / "f.json"
    sched.write_text(json.dumps({"num_stages": 4, "failures": [{"step": 3, "stage": 1}]}))
    a = SimpleNamespace(storage_bandwidth_mb_s=100.0, checkfree_fallback_every=20)
    names = conv.strategy_names(["no_failure", "checkfree", "checkfree_plus", "checkpoint", "redundant"], [5, 20])
    assert names == ["no_failure", "checkfree", "checkfree_plus", "checkpoint_5", "checkpoint_20", "redundant"]
    modes = {}
    for name in names:
        cfg = conv.strategy_config(name, a, None if name == "no_failure" else str(sched), str(tmp_path / name))
        _, cf = split_deepspeed_config(cfg)
        modes[name] = (cf.mode, cf.checkpoint_every, cf.failure_schedule is not None)
    assert modes == {"no_failure": ("off", 0, False), "checkfree": ("checkfree", 20, True),
                     "checkfree_plus": ("checkfree_plus", 0, True), "checkpoint_5": ("off", 5, True),
                     "checkpoint_20": ("off", 20, True), "redundant": ("redundant", 0, True)}
