"""DeepSpeed checkpoints of a run: periodic saves, and the one way back to the last of them.

Used by the checkpoint baseline (``checkpoint_every``), by CheckFree's fallback when its
rules cannot rebuild a loss (``fallback_checkpoint_dir``), by a restarted job
(``--resume_from``), and by survivors that stop for good (their stage's in-memory state).
Every load is "load the latest, barrier, resume at its step + 1" (``load_latest``).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from ds_checkfree.recovery.rules import UnrecoverableFailure


def dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def has_checkpoint(path: str | None) -> bool:
    return bool(path) and os.path.exists(os.path.join(path, "latest"))


@dataclass
class Loaded:
    """What ``load_latest`` did: where training resumes, and what the load cost."""
    resume_step: int
    seconds: float
    bytes: int

    def event(self, **extra) -> dict:
        # "restore": which checkpoint baseline this is (a harness tells them apart by it)
        return {"seconds": round(self.seconds, 6), "resumed_from": self.resume_step - 1, "bytes": self.bytes,
                "restore": "global_rollback", **extra}


class Checkpointer:
    """The run's checkpoint directory and the bookkeeping around DeepSpeed's save/load."""

    def __init__(self, cf):
        self.directory = cf.checkpoint_dir or cf.fallback_checkpoint_dir
        self.every = cf.checkpoint_every
        self.bandwidth_mb_s = cf.storage_bandwidth_mb_s

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def exists(self, directory: str | None = None) -> bool:
        return has_checkpoint(directory or self.directory)

    def charged(self, size: int) -> dict:
        """``storage_bandwidth_mb_s``: what moving ``size`` bytes would take on that storage."""
        bw = self.bandwidth_mb_s
        return {"charged_s": round(size / (bw * 1e6), 6), "bandwidth_mb_s": bw} if bw else {}

    def save(self, engine, step: int) -> dict:
        """Every rank saves its part (collective); returns the ``checkpoint_save`` event's fields."""
        t0 = time.perf_counter()
        engine.save_checkpoint(self.directory, tag=f"step{step}", client_state={"step": step})
        torch.distributed.barrier()
        seconds = time.perf_counter() - t0
        size = dir_bytes(os.path.join(self.directory, f"step{step}"))
        return {"seconds": round(seconds, 6), "bytes": size, **self.charged(size)}

    def load_latest(self, engine, directory: str | None = None, why: str = "") -> Loaded:
        """Every rank loads the latest checkpoint (collective); raises ``UnrecoverableFailure``
        naming ``why`` when there is none."""
        directory = directory or self.directory
        if not has_checkpoint(directory):
            raise UnrecoverableFailure(f"{why}{' and ' if why else ''}no checkpoint exists yet in {directory!r}")
        t0 = time.perf_counter()
        tag_path, client = engine.load_checkpoint(directory)
        torch.distributed.barrier()
        seconds = time.perf_counter() - t0
        if tag_path is None or client is None or "step" not in client:
            raise UnrecoverableFailure(f"the checkpoint in {directory!r} could not be loaded")
        engine.reset_lr_scale()  # the saved weights need no compensation
        step = int(client["step"])
        return Loaded(resume_step=step + 1, seconds=seconds, bytes=dir_bytes(os.path.join(directory, f"step{step}")))

    def load_stage(self, engine) -> dict:
        """The paper's checkpoint baseline: this (lost) rank alone reloads its stage's layer
        files and optimizer state from the latest checkpoint, without a collective (DeepSpeed's
        ``load_checkpoint`` is collective and rewinds the step counters; the other stages go
        on and the step counter must not move). The stage comes back stale, with the
        optimizer state it had then and no lr factor. Returns ``step``, ``seconds``, ``bytes``."""
        t0 = time.perf_counter()
        with open(os.path.join(self.directory, "latest")) as f:
            tag = f.read().strip()
        ckpt_dir, size = os.path.join(self.directory, tag), 0
        module = engine.module
        with torch.no_grad():
            for idx, layer in enumerate(module.forward_funcs):
                if not hasattr(layer, "load_state_dict"):
                    continue
                path = module.ckpt_layer_path(ckpt_dir, idx)
                layer.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
                size += os.path.getsize(path)
        states_path = engine._get_ckpt_name(self.directory, tag)
        states = torch.load(states_path, map_location="cpu", weights_only=False)
        size += os.path.getsize(states_path)
        engine.optimizer.load_state_dict(states["optimizer"])
        for p in module.parameters():
            p.grad = None
        engine.stage_state.reset()  # no gradient history, no lr factor: the saved stage needs none
        return {"step": int(states["step"]), "seconds": time.perf_counter() - t0, "bytes": size}

    def save_stopped_state(self, state: dict, step: int, stage: int, steps_done: int) -> dict | None:
        """A survivor stopping for good writes its stage's in-memory state, without any
        collective, so that a restarted job can rebuild the lost stage from the files.
        Returns the ``checkpoint_save`` event's fields (None: no directory configured)."""
        if not self.directory:
            return None
        path = os.path.join(self.directory, f"stopped_step{step}", f"stage{stage}.pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        t0 = time.perf_counter()
        torch.save({"step_completed": steps_done, "stage": stage, **state}, path)
        return {"seconds": round(time.perf_counter() - t0, 6), "bytes": os.path.getsize(path), "partial": True,
                "path": path}
