"""Baselines that CheckFree is compared against (besides DeepSpeed checkpointing).

``redundant``: Bamboo's redundant computation (NSDI'23): every stage keeps an exact,
step-by-step shadow copy of its successor, so a lost stage is restored bit for bit, and
(``checkfree.redundant_forward: true``, the default) runs the successor's forward on every
micro-batch; ``false`` is the labelled lower bound (gradient shipping only).
"""
from ds_checkfree.baselines.redundant import RedundantShadow, RedundantRecoveryRecord, shadow_layout_bytes

__all__ = ["RedundantShadow", "RedundantRecoveryRecord", "shadow_layout_bytes"]
