"""What CheckFree keeps about a stage beyond DeepSpeed's own weights and optimizer state.

Two things: the learning-rate factor a rebuilt stage keeps (``lr_scale``), and the
gradient norms of the last step, the weights a neighbour's rebuild uses. They live in one
object owned by the engine, so that wiping a stage, installing recovered weights, a
rollback and carrying a stage into a rebuilt engine each change them in one place.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

_NAN = float("nan")


@dataclass
class StageRecoveryState:
    """Per-stage recovery state; the norms are NaN until the first optimizer step."""
    lr_scale: float = 1.0
    #: whole-stage gradient norm of the last step, before and after DeepSpeed's clipping
    grad_norm_pre_clip: float = _NAN
    grad_norm_post_clip: float = _NAN
    #: the same over the decoder layers only (what a rebuild averages)
    decoder_grad_norm_pre_clip: float = _NAN
    decoder_grad_norm_post_clip: float = _NAN

    def reset(self) -> None:
        """A fresh node: no history, learning rate as configured."""
        self.load(StageRecoveryState().snapshot())

    def rebuilt(self, lr_scale: float) -> None:
        """A stage just rebuilt: no gradient history yet, and the learning-rate factor it keeps."""
        self.reset()
        self.lr_scale = float(lr_scale)

    def clear_lr_scale(self) -> None:
        self.lr_scale = 1.0

    def snapshot(self) -> dict:
        return dataclasses.asdict(self)

    def load(self, snap: dict) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, float(snap[f.name]))

    def record_pre_clip(self, stage_sq: float, decoder_sq: float) -> None:
        """Norms from squared sums; until clipping scales them, post-clip equals pre-clip."""
        self.grad_norm_pre_clip = self.grad_norm_post_clip = math.sqrt(stage_sq)
        self.decoder_grad_norm_pre_clip = self.decoder_grad_norm_post_clip = math.sqrt(decoder_sq)

    def record_clip_factor(self, factor: float) -> None:
        """DeepSpeed multiplied every gradient by ``factor``: the post-clip norms follow."""
        self.grad_norm_post_clip = self.grad_norm_pre_clip * factor
        self.decoder_grad_norm_post_clip = self.decoder_grad_norm_pre_clip * factor

    def norm(self, grad_norm: str, norm_scope: str) -> float:
        """The norm selected by ``checkfree.grad_norm`` ("pre_clip"/"post_clip") and
        ``checkfree.norm_scope`` ("decoder"/"stage")."""
        prefix = "decoder_" if norm_scope == "decoder" else ""
        return getattr(self, f"{prefix}grad_norm_{grad_norm}")

    def pair(self, norm_scope: str) -> tuple[float, float]:
        """(pre-clip, post-clip) over the configured scope, for the metrics line."""
        return self.norm("pre_clip", norm_scope), self.norm("post_clip", norm_scope)
