"""``--dump_recovery_dir``: a rank's whole stage state saved around each recovery (a debug aid
that the tests use to check rebuilt weights against an independent computation)."""
from __future__ import annotations

import os

import torch


def dump_stage(directory: str | None, engine, step: int, tag: str, redundant=None) -> None:
    if not directory:
        return
    e = engine
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().clone() for k, v in e.module.recovery_state(include_replicated=True).items()}
    # what recovery moves: the fp32 masters under bf16, else the parameters again. Masters split
    # over replicas are read by a collective of the stage's replicas: not in the "wiped" dump,
    # the only one taken on the lost ranks alone
    fp32_state = None
    if tag != "wiped" or not getattr(e, "masters_partitioned", False):
        fp32_state = {k: v.detach().clone() for k, v in e.recovery_weights(include_replicated=True).items()}
    opt_state = sum(len(s) for s in e.optimizer.state.values()) if hasattr(e.optimizer, "state") else -1
    dp = e.grid.get_data_parallel_id()
    torch.save({"state": state, "fp32_state": fp32_state, **e.stage_state.snapshot(), "recovery_norm": e.last_grad_norm(),
                "effective_lr": e.effective_lr(), "optimizer_state_entries": opt_state,
                "optimizer_state_dict": e.optimizer.state_dict(), "stage": e.stage_id, "dp": dp},
               os.path.join(directory, f"step{step}_stage{e.stage_id}_dp{dp}_{tag}.pt"))
    if redundant is not None:
        redundant.dump(directory, step, tag)
