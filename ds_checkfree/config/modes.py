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

#: where the (de)embedding sits and which stages may fail (issue #11, item 1)
#: "all_stages_fail": embedding in front of stage 0's decoder layers, norm + head behind the
#: last stage's, every stage may fail; "paper": the reference code's layout, embedding alone
#: on stage 0 and norm + head alone on stage S-1, those two never fail
LAYOUTS = ("all_stages_fail", "paper")
#: modes the paper layout is implemented for (CheckFree+ swaps the edge stages, which the
#: paper layout keeps out of the pipeline's failure domain; the redundant shadow ring is untested)
PAPER_LAYOUT_MODES = ("off", "checkfree")
MIN_STAGES_PAPER = 3
MIN_STAGES_PAPER_WHY = ("the paper's layout puts the embedding alone on stage 0 and the final norm + LM "
                        "head alone on stage S-1, so at least one stage in between must hold the decoder "
                        "layers (with 3 or 4 stages every decoder stage is a first/last block stage, "
                        "restored from its in-memory copy; from 5 stages on the middle ones are averaged)")
#: gradient clipping: DeepSpeed's one global norm, or each stage its own norm (the reference)
CLIP_SCOPES = ("global", "stage")
#: what a rate draw is keyed by: the logical step (a redone step never fails again) or the
#: executed step (every loop iteration draws, redone steps included: the paper's time model)
FAILURE_DRAWS = ("logical_step", "executed_step")
#: what "restore from the checkpoint" means: every rank rolls back (DeepSpeed practice), or
#: only the lost stage reloads its own stale weights and optimizer state (the paper's baseline)
CHECKPOINT_RESTORES = ("global_rollback", "lost_stage")
#: modes whose losses may be restored stage by stage from a checkpoint: CheckFree+'s tied
#: (de)embedding replicas would diverge from their live partner, the redundant ring restores itself
LOST_STAGE_RESTORE_MODES = ("off", "checkfree")

#: the reference code's hard-coded per-iteration failure probabilities (gensyn-ai/CheckFree
#: configs), name -> (per-step probability, the %/h the reference labels it with)
RATE_PRESETS = {
    "500m_5": (0.0009, 5.0), "500m_10": (0.002, 10.0), "500m_16": (0.004, 16.0), "500m_33": (0.01, 33.0),
    "124m_10": (0.0006, 10.0), "124m_16": (0.001, 16.0),
    "1.5b_10": (0.004, 10.0), "1.5b_16": (0.008, 16.0),
}
