"""The convergence harness's strategies: one registry line each, and the run config each one gets."""
from __future__ import annotations

import os
from dataclasses import dataclass

from benchmarks._runs import base_config
from ds_checkfree.config.checkfree import CheckFreeConfig

NO_FAILURE = "no_failure"


@dataclass(frozen=True)
class Strategy:
    """One way of surviving failures, as the harness runs it."""
    name: str
    mode: str                       # checkfree.mode
    label: str
    num_stages: int = 4
    checkfree: tuple = ()           # extra checkfree keys, as (key, value) pairs
    checkpoint_every: int = 0       # checkpoint interval (the baseline's, or CheckFree's fallback)
    requires: tuple = ()            # checkfree config keys this strategy needs
    recovery: str = "convergence"   # projection model: "reference", "convergence", "rollback", "exact"
    step_variant: str = "stock"     # which step_time.py variant gives its step-time ratio

    def available(self) -> bool:
        return all(k in CheckFreeConfig.field_names() for k in self.requires)

    @property
    def layout(self) -> str:
        return dict(self.checkfree).get("layout", "all_stages_fail")

    def never_fail(self) -> list[int]:
        """Stages its layout excludes from failures (the paper layout's embedding and head stages)."""
        if self.layout == "all_stages_fail":
            return []
        from ds_checkfree.config.layout import never_fail_stages
        return list(never_fail_stages(self.num_stages, self.layout))


def strategy_registry(checkpoint_every: list[int], fallback_every: int) -> list[Strategy]:
    """Every strategy the harness knows, in table order. One line each."""
    fb = (f"fallback ckpt/{fallback_every}" if fallback_every else "no fallback")
    out = [
        Strategy(NO_FAILURE, "off", "no failures (reference)", recovery="reference"),
        Strategy("checkfree", "checkfree", f"CheckFree, all stages fail ({fb})", checkpoint_every=fallback_every,
                 step_variant="checkfree"),
        # the paper's layout: embedding alone on stage 0 and norm + head alone on stage S-1 (never fail),
        # 4 block stages in between as in the reference's 124M config; first/last block stage from a copy
        Strategy("checkfree_paper", "checkfree", "CheckFree, paper layout (emb + 4 block stages + head)",
                 num_stages=6, checkfree=(("layout", "paper"),), requires=("layout",), step_variant="checkfree"),
        Strategy("checkfree_stageclip", "checkfree", f"CheckFree, per-stage clipping ({fb})",
                 checkfree=(("clip_scope", "stage"),), checkpoint_every=fallback_every, requires=("clip_scope",),
                 step_variant="checkfree"),
        Strategy("checkfree_plus", "checkfree_plus", "CheckFree+, 4 stages (every stage swapped)",
                 checkfree=(("swap", True),), step_variant="plus"),
        Strategy("checkfree_plus_6", "checkfree_plus", "CheckFree+, 6 stages", num_stages=6,
                 checkfree=(("swap", True),), step_variant="plus"),
    ]
    out += [Strategy(f"checkpoint_{k}", "off", f"checkpoint/{k}, global rollback", checkpoint_every=k,
                     recovery="rollback") for k in checkpoint_every]
    # the paper's checkpoint baseline: the new node reloads its stage's stale state, the others go on
    out += [Strategy(f"ckpt_stage_{k}", "off", f"checkpoint/{k}, stage-only reload (no rollback)",
                     checkfree=(("checkpoint_restore", "lost_stage"),), checkpoint_every=k,
                     requires=("checkpoint_restore",))
            for k in checkpoint_every]
    out += [
        Strategy("redundant", "redundant", "redundant computation (Bamboo: redundant forward)",
                 checkfree=(("redundant_forward", True),), requires=("redundant_forward",), recovery="exact",
                 step_variant="redundant"),
        Strategy("redundant_lb", "redundant", "redundant, lower bound (gradient shipping only)",
                 checkfree=(("redundant_forward", False),), requires=("redundant_forward",), recovery="exact",
                 step_variant="redundant_lb"),
    ]
    return out


def select_strategies(registry: list[Strategy], wanted: list[str]) -> list[Strategy]:
    """By name, or by kind: "checkpoint" = every checkpoint_K, "ckpt_stage" = every ckpt_stage_K,
    "all" = everything. The reference is always included first."""
    chosen = []
    for w in wanted:
        if w == "all":
            hits = registry
        elif w in ("checkpoint", "ckpt_stage"):
            hits = [s for s in registry if s.name.startswith(w + "_")]
        else:
            hits = [s for s in registry if s.name == w]
        if not hits:
            raise SystemExit(f"--strategies: unknown {w!r}; choose from {[s.name for s in registry]} "
                             "(or the kinds checkpoint, ckpt_stage, all)")
        chosen += [s for s in hits if s not in chosen]
    ref = next(s for s in registry if s.name == NO_FAILURE)
    return [ref] + [s for s in chosen if s.name != NO_FAILURE]


def strategy_config(st: Strategy, a, schedule: str | None, run_dir: str) -> dict:
    ckpt_dir = os.path.join(run_dir, "ckpt")
    extra = dict(st.checkfree)
    if st.mode != "off" or st.checkpoint_every or schedule:
        extra["storage_bandwidth_mb_s"] = a.storage_bandwidth_mb_s
    if schedule and getattr(a, "failure_draws", None) == "executed_step":
        # every executed step draws (redone ones too): seeded draws at the rate instead of a replayed file
        rate, seed = schedule
        extra.update(failure_rate=rate, assumed_step_seconds=a.assumed_step_seconds, failure_seed=seed,
                     failure_draws="executed_step")
    elif schedule:
        extra["failure_schedule"] = schedule
    if st.checkpoint_every:
        extra.update(checkpoint_every=st.checkpoint_every, checkpoint_dir=ckpt_dir)
    cfg = base_config(st.mode, **extra)
    cfg["checkfree"]["num_stages"] = st.num_stages
    return cfg

