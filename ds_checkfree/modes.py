"""The modes and recovery methods, and why each mode needs a minimum number of stages.

One source of truth: the config validation, the layout, the recovery planner and the
schedule all read these names from here.
"""
from __future__ import annotations

MODES = ("off", "checkfree", "checkfree_plus", "redundant")
#: methods a user can choose for an intermediate stage (the paper's rule and its ablations)
RECOVERY_METHODS = ("weighted_average", "mean", "copy_prev", "copy_next", "random")
GRAD_NORMS = ("post_clip", "pre_clip")
NORM_SCOPES = ("decoder", "stage")

#: CheckFree+ swaps the first two stages and the last two: the pairs must be disjoint
MIN_STAGES_FOR_SWAP = 4
MIN_STAGES = {"off": 1, "checkfree": 3, "checkfree_plus": MIN_STAGES_FOR_SWAP, "redundant": 2}
MIN_STAGES_WHY = {
    "off": "a pipeline needs at least one stage",
    "checkfree": "CheckFree rebuilds a lost intermediate stage from its two neighbours, "
    "so there must be at least one intermediate stage (stages 0 < i < S-1)",
    "checkfree_plus": "CheckFree+ swaps stages (0, 1) and (S-2, S-1) on odd micro-batches, "
    "and the two swap pairs must be disjoint",
    "redundant": "the redundant-computation baseline keeps each stage's shadow copy on its "
    "predecessor in a ring, which needs a second stage",
}
