"""Optimizers with learned per-weight step sizes, and the curvature products they use.

This package does no logging and no I/O.
"""

from stepcli.optim.curvature import backward_and_step, ggn_vp, hvp, sampled_label_grads
from stepcli.optim.functional import learned_step_size, step_sizes, update_curvature_estimate
from stepcli.optim.learned_step_size import LearnedStepSize

__all__ = [
    "LearnedStepSize",
    "backward_and_step",
    "ggn_vp",
    "hvp",
    "learned_step_size",
    "sampled_label_grads",
    "step_sizes",
    "update_curvature_estimate",
]
