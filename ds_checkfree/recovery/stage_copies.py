"""In-memory copies of the first and last block stage (the paper's layout, plain CheckFree).

The reference code restores a lost first/last block stage from a copy of it refreshed every
100 iterations (no rollback, no neighbour average: its outer neighbour holds only the
embedding or the head). In a real pipeline that copy must outlive the stage's node, so it
lives on the never-failing neighbour (``layout.copy_holders``): every ``stage_copy_every``
steps the block stage sends its weights there, and a restore sends them back. Every rank
calls ``refresh`` at the same step boundaries, so the point-to-point pairs always match.
"""
from __future__ import annotations

import torch
from deepspeed import comm as dist

from ds_checkfree.pipe.devices import comm_empty, pack_fp32, unpack_like
from ds_checkfree.config.layout import copy_holders
from ds_checkfree.pipe.parts import block_parameter_count


class StageCopies:
    """The copies this rank holds (if it is a holder) and the step every copy was taken at."""

    def __init__(self, num_stages: int, layout: str, mode: str, every: int):
        self.holders = copy_holders(num_stages, layout, mode)  # block stage -> holder stage
        self.every = int(every)
        #: the last completed step the copies were taken after (the same on every rank); None: none yet
        self.copy_step: int | None = None
        self._held: dict[int, torch.Tensor] = {}  # block stage -> its flat fp32 weights, on the holder

    @property
    def active(self) -> bool:
        return bool(self.holders)

    def refresh(self, engine, completed_step: int) -> bool:
        """At a step boundary: if a copy is due (none yet, or every ``every`` completed steps),
        each block stage sends its weights (fp32, or the fp32 masters) to its holder. Returns
        whether the copies were refreshed. Masters split over replicas (bf16, dp > 1) are read
        whole, a collective of the stage's replicas: they all reach it, in the holders' order."""
        if not self.holders or (self.copy_step is not None and completed_step % self.every):
            return False
        grid, me = engine.grid, engine.global_rank
        dp = grid.get_data_parallel_id()
        for stage, holder in self.holders.items():
            src, dst = grid.stage_to_global(stage_id=stage, data=dp), grid.stage_to_global(stage_id=holder, data=dp)
            if me == src:
                dist.send(pack_fp32(engine.recovery_weights(include_replicated=False)), dst)
            elif me == dst:
                buf = self._held.get(stage)
                if buf is None:
                    buf = comm_empty(self._numel(engine, stage), torch.float32)
                dist.recv(buf, src)
                self._held[stage] = buf
        self.copy_step = completed_step
        return True

    def _numel(self, engine, stage: int) -> int:
        """Parameters of block ``stage``: block stages are alike (the alignment rule), so the
        holder (which holds no block itself) counts them from the block spec on the meta device."""
        per_block = block_parameter_count(engine.module.model_parts.blocks)
        if per_block is None:
            raise RuntimeError(f"layout 'paper' keeps copies of block stages, but a block of "
                               f"{engine.module.model_parts.name} cannot be built on the meta device to size them")
        return len(engine.module.slots[stage]) * per_block

    def send_back(self, stage: int, target_rank: int) -> None:
        """The holder's half of a restore."""
        dist.send(self._held[stage], target_rank)

    def receive(self, engine, source_rank: int) -> dict:
        """The restored stage's half: its weights as they were at ``copy_step``."""
        template = engine.module.recovery_state(include_replicated=False)
        flat = comm_empty(sum(t.numel() for t in template.values()), torch.float32)
        dist.recv(flat, source_rank)
        return unpack_like(flat, template)

    def nbytes(self, engine, stage: int) -> int:
        return self._numel(engine, stage) * 4
