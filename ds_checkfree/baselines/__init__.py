"""Baselines that CheckFree is compared against (besides DeepSpeed checkpointing).

``redundant``: Bamboo-style redundant computation (NSDI'23): every stage keeps an exact,
step-by-step shadow copy of its successor, so a lost stage is restored bit for bit.
"""
from .redundant import RedundantShadow, RedundantRecoveryRecord, shadow_layout_bytes

__all__ = ["RedundantShadow", "RedundantRecoveryRecord", "shadow_layout_bytes"]
