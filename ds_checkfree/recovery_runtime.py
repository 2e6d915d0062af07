"""Applying recovery plans inside a running pipeline.

The pure rules and math live in ``ds_checkfree.recovery``; this module moves tensors. The
lost stage's rank receives its sources' weights (and gradient norms) over the pipeline's
own process group, combines them, installs them, and starts with fresh optimizer state
and a raised learning rate. Every rank walks the same plan in the same order, so the
blocking point-to-point messages pair up without a deadlock.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from deepspeed import comm as dist

from .recovery import RecoveryAction, combine, plan_recovery


@dataclass
class RecoveryRecord:
    """What one recovery did, written to metrics.jsonl as a ``recovery`` event."""
    stage: int
    method: str
    sources: list
    weights: list
    seconds: float
    bytes_received: int
    lr_scale: float

    def as_event(self) -> dict:
        return {"method": self.method, "sources": list(self.sources),
                "weights": [float(w) for w in self.weights], "seconds": round(self.seconds, 6),
                "bytes_received": int(self.bytes_received), "lr_scale": self.lr_scale}


def _flatten(state) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in state.values()])


def _unflatten(flat: torch.Tensor, template) -> dict:
    out, offset = {}, 0
    for key, t in template.items():
        n = t.numel()
        out[key] = flat[offset:offset + n].view(t.shape).to(t.dtype)
        offset += n
    return out


def stable_seed(*parts) -> int:
    """A seed from ``parts`` that every process computes alike (``hash()`` of a string
    changes between processes unless PYTHONHASHSEED is set)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def _send_state(engine, action: RecoveryAction, target_rank: int) -> None:
    state = engine.module.recovery_state(include_replicated=action.method == "copy")
    norm = torch.tensor([engine.last_grad_norm()], dtype=torch.float64)
    dist.send(norm, target_rank)
    dist.send(_flatten(state), target_rank)


def _receive_and_install(engine, action: RecoveryAction, source_ranks: list[int], generator) -> RecoveryRecord:
    start = time.perf_counter()
    template = engine.module.recovery_state(include_replicated=action.method == "copy")
    numel = sum(t.numel() for t in template.values())
    states, norms, received = [], [], 0
    for src in source_ranks:
        norm = torch.zeros(1, dtype=torch.float64)
        dist.recv(norm, src)
        flat = torch.empty(numel, dtype=torch.float32)
        dist.recv(flat, src)
        received += norm.numel() * 8 + flat.numel() * 4
        norms.append(float(norm))
        states.append(_unflatten(flat, template))
    cf = engine.checkfree
    init_std = getattr(engine.module.model_config, "init_std", 0.02)
    combined, weights = combine(action.method, states, norms, cf.epsilon, template, generator, init_std)
    engine.install_recovered(combined, cf.lr_scale, include_replicated=action.method == "copy")
    return RecoveryRecord(stage=action.stage, method=action.method, sources=list(action.sources), weights=weights,
                          seconds=time.perf_counter() - start, bytes_received=received, lr_scale=cf.lr_scale)


def _share(record, src_rank: int):
    """Every rank learns the record (the metrics writer sits on another stage)."""
    box = [record]
    tdist.broadcast_object_list(box, src=src_rank)
    return box[0]


def apply_plan(engine, actions: list[RecoveryAction], step: int) -> list[RecoveryRecord]:
    """Run non-checkpoint recovery actions on every rank; returns the records (same on all ranks)."""
    grid = engine.grid
    my_dp = grid.get_data_parallel_id()
    records = []
    for action in actions:
        for dp in range(grid.get_data_parallel_world_size()):
            target = grid.stage_to_global(stage_id=action.stage, data=dp)
            sources = [grid.stage_to_global(stage_id=s, data=dp) for s in action.sources]
            if dp == my_dp and engine.global_rank in sources:
                _send_state(engine, action, target)
            record = None
            if engine.global_rank == target:
                gen = torch.Generator().manual_seed(stable_seed("rebuild", step, action.stage, dp))
                record = _receive_and_install(engine, action, sources, gen)
            record = _share(record, target)
            if dp == 0:
                records.append(record)
    return records


def plan_for(engine, lost: list[int]) -> list[RecoveryAction]:
    cf = engine.checkfree
    return plan_recovery(lost, engine.num_stages, engine.module.mode, method=cf.recovery_method,
                         has_checkpoint=bool(cf.fallback_checkpoint_dir or cf.checkpoint_dir))
