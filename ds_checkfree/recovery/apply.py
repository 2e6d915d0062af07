"""Applying recovery plans inside a running pipeline.

The pure rules and math live in ``ds_checkfree.recovery.rules``; this module moves tensors. The
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

from ds_checkfree.pipe.devices import comm_device, comm_empty, comm_tensor, object_to_tensor, pack_fp32, tensor_to_object, \
    unpack_like
from ds_checkfree.recovery.rules import RecoveryAction, combine, plan_replicated_recovery


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
    #: the data-parallel replica restored (method "replica"), None when every replica was rebuilt
    replica: int | None = None
    source_replica: int | None = None
    #: method-specific fields (a stage copy's or checkpoint's step and staleness, bytes charged)
    extra: dict | None = None

    def as_event(self) -> dict:
        out = {"method": self.method, "sources": list(self.sources),
               "weights": [float(w) for w in self.weights], "seconds": round(self.seconds, 6),
               "bytes_received": int(self.bytes_received), "lr_scale": self.lr_scale}
        if self.replica is not None:
            out.update(replica=self.replica, source_replica=self.source_replica)
        return {**out, **(self.extra or {})}


def stable_seed(*parts) -> int:
    """A seed from ``parts`` that every process computes alike (``hash()`` of a string
    changes between processes unless PYTHONHASHSEED is set)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def _send_state(engine, action: RecoveryAction, target_rank: int, state=None) -> None:
    """``state``: this stage's weights when already read (partitioned masters: see ``apply_plan``)."""
    if state is None:
        state = engine.recovery_weights(include_replicated=action.method == "copy")
    dist.send(comm_tensor([engine.last_grad_norm()], torch.float64), target_rank)
    dist.send(pack_fp32(state), target_rank)


def _receive_and_install(engine, action: RecoveryAction, source_ranks: list[int], generator) -> RecoveryRecord:
    start = time.perf_counter()
    template = engine.module.recovery_state(include_replicated=action.method == "copy")
    numel = sum(t.numel() for t in template.values())
    states, norms, received = [], [], 0
    for src in source_ranks:
        norm = comm_empty(1, torch.float64, zeros=True)
        dist.recv(norm, src)
        flat = comm_empty(numel, torch.float32)
        dist.recv(flat, src)
        received += norm.numel() * 8 + flat.numel() * 4
        norms.append(float(norm))
        states.append(unpack_like(flat, template))
    cf = engine.checkfree
    init_std = engine.module.init_std
    combined, weights = combine(action.method, states, norms, cf.epsilon, template, generator, init_std)
    engine.install_recovered(combined, cf.lr_scale, include_replicated=action.method == "copy")
    return RecoveryRecord(stage=action.stage, method=action.method, sources=list(action.sources), weights=weights,
                          seconds=time.perf_counter() - start, bytes_received=received, lr_scale=cf.lr_scale)


def share_record(record, src_rank: int):
    """Every rank learns the record (the metrics writer sits on another stage)."""
    box = [record]
    tdist.broadcast_object_list(box, src=src_rank)
    return box[0]


def _copy_replica(engine, action: RecoveryAction, source: int, target: int) -> RecoveryRecord | None:
    """Exact copy of a live replica of the same stage: weights (fp32, or the fp32 masters),
    optimizer state, gradient norms and learning-rate factor, so the replicas stay identical.
    Weights travel as one flat tensor on the communication device; the optimizer state and
    the stage's recovery state as one serialised blob (one host copy each way)."""
    if engine.global_rank == source:
        dist.send(pack_fp32(engine.replica_weights()), target)
        blob = object_to_tensor(engine.replica_state(), comm_device())
        dist.send(comm_tensor([blob.numel()], torch.int64), target)
        dist.send(blob, target)
        return None
    start = time.perf_counter()
    template = engine.module.recovery_state(include_replicated=True)
    flat = comm_empty(sum(t.numel() for t in template.values()), torch.float32)
    dist.recv(flat, source)
    n = comm_empty(1, torch.int64, zeros=True)
    dist.recv(n, source)
    blob = comm_empty(int(n), torch.uint8)
    dist.recv(blob, source)
    state = tensor_to_object(blob, map_location=flat.device)
    partitioned = engine.masters_partitioned
    engine.install_replica(unpack_like(flat, template), state)
    extra = {"masters_from": "bf16 weights", "fresh_moments": True} if partitioned else None
    return RecoveryRecord(stage=action.stage, method="replica", sources=[action.stage], weights=[1.0],
                          seconds=time.perf_counter() - start, bytes_received=flat.numel() * 4 + 8 + int(n),
                          lr_scale=engine.lr_scale, replica=action.replica, source_replica=action.source_replica,
                          extra=extra)


def _restore_from_copy(engine, action: RecoveryAction, step: int, copies, holder: int, target: int):
    """Layout "paper": the block stage's weights come back from its holder's in-memory copy;
    fresh optimizer state and the lr factor as for any rebuilt stage."""
    if copies is None or copies.copy_step is None:
        raise RuntimeError(f"stage {action.stage} is planned from its in-memory copy, but no copy is kept here "
                           "(StageCopies not passed or never refreshed)")
    if engine.global_rank == holder:
        copies.send_back(action.stage, target)
        return None
    if engine.global_rank != target:
        return None
    start = time.perf_counter()
    weights = copies.receive(engine, holder)
    lr_scale = engine.checkfree.lr_scale
    engine.install_recovered(weights, lr_scale, include_replicated=False)
    return RecoveryRecord(stage=action.stage, method="stage_copy", sources=list(action.sources), weights=[1.0],
                          seconds=time.perf_counter() - start, bytes_received=copies.nbytes(engine, action.stage),
                          lr_scale=lr_scale, extra={"copy_of_step": copies.copy_step,
                                                    "staleness_steps": step - 1 - copies.copy_step})


def _restore_from_checkpoint(engine, action: RecoveryAction, step: int, checkpointer, target: int):
    """The paper's checkpoint baseline: the lost stage alone reloads its stale state, no collective."""
    if engine.global_rank != target:
        return None
    loaded = checkpointer.load_stage(engine)
    return RecoveryRecord(stage=action.stage, method="checkpoint_stage", sources=[], weights=[],
                          seconds=loaded["seconds"], bytes_received=loaded["bytes"], lr_scale=1.0,
                          extra={"restore": "lost_stage", "checkpoint_step": loaded["step"],
                                 "staleness_steps": step - 1 - loaded["step"], "bytes": loaded["bytes"],
                                 **checkpointer.charged(loaded["bytes"])})


def apply_plan(engine, actions: list[RecoveryAction], step: int, copies=None,
               checkpointer=None) -> list[RecoveryRecord]:
    """Run non-rollback recovery actions on every rank; returns the records (same on all ranks).

    Replica copies come first in a plan (``plan_replicated_recovery``), so a column rebuilt
    next to a restored replica reads the restored state. ``copies`` (``StageCopies``) serves
    ``stage_copy`` actions, ``checkpointer`` (``Checkpointer``) ``checkpoint_stage`` ones."""
    grid = engine.grid
    my_dp = grid.get_data_parallel_id()
    records = []
    for action in actions:
        if action.method in ("stage_copy", "checkpoint_stage"):
            if action.method == "checkpoint_stage" and checkpointer is None:
                raise RuntimeError(f"stage {action.stage} is planned from the checkpoint, but no Checkpointer given")
            for dp in range(grid.get_data_parallel_world_size()):
                target = grid.stage_to_global(stage_id=action.stage, data=dp)
                if action.method == "stage_copy":
                    holder = grid.stage_to_global(stage_id=action.sources[0], data=dp)
                    record = _restore_from_copy(engine, action, step, copies, holder, target)
                else:
                    record = _restore_from_checkpoint(engine, action, step, checkpointer, target)
                record = share_record(record, target)
                if dp == 0:
                    records.append(record)
            continue
        if action.method == "replica":
            target = grid.stage_to_global(stage_id=action.stage, data=action.replica)
            source = grid.stage_to_global(stage_id=action.stage, data=action.source_replica)
            record = None
            if engine.global_rank in (source, target):
                record = _copy_replica(engine, action, source, target)
            records.append(share_record(record, target))
            continue
        mine = None
        if engine.masters_partitioned and engine.stage_id in action.sources:
            # reading whole masters is a collective of this stage's replicas: every replica reads
            # here, before any of them sends, or one blocked in a send would starve the others
            mine = engine.recovery_weights(include_replicated=action.method == "copy")
        for dp in range(grid.get_data_parallel_world_size()):
            target = grid.stage_to_global(stage_id=action.stage, data=dp)
            sources = [grid.stage_to_global(stage_id=s, data=dp) for s in action.sources]
            if dp == my_dp and engine.global_rank in sources:
                _send_state(engine, action, target, mine)
            record = None
            if engine.global_rank == target:
                # the same seed for every replica: a "random" rebuild keeps the replicas identical
                gen = torch.Generator().manual_seed(stable_seed("rebuild", step, action.stage, 0))
                record = _receive_and_install(engine, action, sources, gen)
            record = share_record(record, target)
            if dp == 0:
                records.append(record)
    return records


def plan_for(engine, lost) -> list[RecoveryAction]:
    """The plan for ``lost``: stage ids (every replica of the stage) or ``(stage, replica)`` pairs."""
    cf = engine.checkfree
    dp_size = engine.grid.get_data_parallel_world_size()
    pairs = sorted({p for x in lost for p in ([(x, r) for r in range(dp_size)] if isinstance(x, int) else [tuple(x)])})
    return plan_replicated_recovery(pairs, engine.num_stages, dp_size, engine.module.mode,
                                    method=cf.recovery_method,
                                    has_checkpoint=bool(cf.fallback_checkpoint_dir or cf.checkpoint_dir),
                                    layout=cf.layout, checkpoint_restore=cf.checkpoint_restore)
