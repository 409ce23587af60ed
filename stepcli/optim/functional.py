"""Update kernels for the learned per-weight step size optimizer.

Each update has a single-tensor reference kernel and a foreach kernel with the same
signature, and one dispatching function picks between them, as ``torch.optim`` does for
Adam. The single-tensor kernel runs one small kernel per op and tensor. The foreach
kernel runs one ``torch._foreach_*`` op per step of the maths over a whole list of
tensors, which on CUDA launches a few fused kernels in place of one per tensor.
Both kernels apply the same ops in the same order, so they agree to rounding.

Every kernel stays on the tensors' device and reads no values back to the host, so a
CUDA step needs no synchronisation.

NOTE: the kernels have been tested on CPU only, where foreach ops fall back to one
kernel per tensor. The fused CUDA foreach path has not been run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["learned_step_size", "step_sizes", "update_curvature_estimate"]

TRACE_RULES = ("gradient", "decay", "hvp")


def learned_step_size(
    params: list[Tensor],
    grads: list[Tensor],
    log_lrs: list[Tensor],
    traces: list[Tensor],
    meta_momenta: list[Tensor],
    curvatures: list[Tensor] | None,
    hvps: list[Tensor] | None,
    *,
    foreach: bool,
    alpha0: float,
    alpha_min: float,
    alpha_max: float,
    meta_lr: float,
    gamma: float,
    meta_momentum: float,
    sign_mix: float,
    trace: str,
) -> None:
    """Apply one learned-step-size update in place, on the foreach or the reference kernel.

    All lists are in the same order. ``curvatures`` is required for ``trace="decay"``
    and ``hvps`` (the products C h with the trace from before this step) for
    ``trace="hvp"``. ``LearnedStepSize`` documents the update rule.
    """
    if trace not in TRACE_RULES:
        raise ValueError(f"invalid trace {trace!r}: must be one of {', '.join(TRACE_RULES)}")
    if trace == "decay" and curvatures is None:
        raise ValueError("trace='decay' requires curvatures, one tensor per parameter")
    if trace == "hvp" and hvps is None:
        raise ValueError("trace='hvp' requires hvps, one tensor per parameter")
    if not params:
        return

    kernel = _multi_tensor_learned_step_size if foreach else _single_tensor_learned_step_size
    kernel(
        params,
        grads,
        log_lrs,
        traces,
        meta_momenta,
        curvatures,
        hvps,
        alpha0=alpha0,
        alpha_min=alpha_min,
        alpha_max=alpha_max,
        meta_lr=meta_lr,
        gamma=gamma,
        meta_momentum=meta_momentum,
        sign_mix=sign_mix,
        trace=trace,
    )


def _single_tensor_learned_step_size(
    params: list[Tensor],
    grads: list[Tensor],
    log_lrs: list[Tensor],
    traces: list[Tensor],
    meta_momenta: list[Tensor],
    curvatures: list[Tensor] | None,
    hvps: list[Tensor] | None,
    *,
    alpha0: float,
    alpha_min: float,
    alpha_max: float,
    meta_lr: float,
    gamma: float,
    meta_momentum: float,
    sign_mix: float,
    trace: str,
) -> None:
    log_alpha_min = math.log(alpha_min)
    log_alpha_max = math.log(alpha_max)
    log_alpha0 = math.log(alpha0)

    for i, param in enumerate(params):
        grad = grads[i]
        log_lr = log_lrs[i]
        h = traces[i]
        m = meta_momenta[i]

        # Hypergradient signal z = g * h, an estimate of -dL/dbeta.
        z = grad * h
        if meta_lr != 0:
            # The sign uses the meta-momentum from before this step's update.
            # lerp(m, z, 1 - c) = c * m + (1 - c) * z.
            meta_direction = torch.lerp(m, z, 1.0 - sign_mix).sign_()
            log_lr.add_(meta_direction, alpha=meta_lr)
            log_lr.clamp_(log_alpha_min, log_alpha_max)
        m.lerp_(z, 1.0 - meta_momentum)

        alpha = _step_size(log_lr, log_alpha0, alpha0, alpha_min, alpha_max)
        param.addcmul_(alpha, grad, value=-1.0)

        if trace == "gradient":
            h.mul_(gamma).addcmul_(alpha, grad)
        elif trace == "decay":
            # d h is computed as h - shrink h with shrink = min(alpha c, 1). The curvature is
            # a moving average of squares, so alpha c >= 0 and d = 1 - shrink is at most 1.
            shrink = torch.mul(alpha, curvatures[i]).clamp_max_(1.0)
            h.addcmul_(h, shrink, value=-1.0).mul_(gamma).addcmul_(alpha, grad)
        else:
            h.addcmul_(alpha, hvps[i], value=-1.0).mul_(gamma).addcmul_(alpha, grad)

        # Overflow or a non-finite product C h would poison the next hypergradient.
        h.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _multi_tensor_learned_step_size(
    params: list[Tensor],
    grads: list[Tensor],
    log_lrs: list[Tensor],
    traces: list[Tensor],
    meta_momenta: list[Tensor],
    curvatures: list[Tensor] | None,
    hvps: list[Tensor] | None,
    *,
    alpha0: float,
    alpha_min: float,
    alpha_max: float,
    meta_lr: float,
    gamma: float,
    meta_momentum: float,
    sign_mix: float,
    trace: str,
) -> None:
    log_alpha_min = math.log(alpha_min)
    log_alpha_max = math.log(alpha_max)
    log_alpha0 = math.log(alpha0)

    tensor_lists = [params, grads, log_lrs, traces, meta_momenta, curvatures, hvps]
    for group in _group_by_device_and_dtype(tensor_lists):
        g_params, g_grads, g_log_lrs, g_traces, g_momenta, g_curvatures, g_hvps = group

        # Cost: 16 elementwise passes over the weights for "gradient", 17 for "hvp" and
        # 19 for "decay". At most two temporaries are alive at once (z and the meta
        # direction, then alpha and the shrink factor), so the peak extra memory is two
        # parameter-sized buffers.
        z = torch._foreach_mul(g_grads, g_traces)
        if meta_lr != 0:
            meta_direction = torch._foreach_lerp(g_momenta, z, 1.0 - sign_mix)
            torch._foreach_sign_(meta_direction)
            torch._foreach_add_(g_log_lrs, meta_direction, alpha=meta_lr)
            del meta_direction
            torch._foreach_clamp_min_(g_log_lrs, log_alpha_min)
            torch._foreach_clamp_max_(g_log_lrs, log_alpha_max)
        torch._foreach_lerp_(g_momenta, z, 1.0 - meta_momentum)
        del z

        alphas = _foreach_step_sizes(g_log_lrs, log_alpha0, alpha0, alpha_min, alpha_max)
        torch._foreach_addcmul_(g_params, alphas, g_grads, value=-1.0)

        if trace == "gradient":
            torch._foreach_mul_(g_traces, gamma)
        elif trace == "decay":
            shrinks = torch._foreach_mul(alphas, g_curvatures)
            torch._foreach_clamp_max_(shrinks, 1.0)
            torch._foreach_addcmul_(g_traces, g_traces, shrinks, value=-1.0)
            del shrinks
            torch._foreach_mul_(g_traces, gamma)
        else:
            torch._foreach_addcmul_(g_traces, alphas, g_hvps, value=-1.0)
            torch._foreach_mul_(g_traces, gamma)
        torch._foreach_addcmul_(g_traces, alphas, g_grads)

        # torch has no foreach op for nan_to_num, so this is one kernel per tensor.
        for h in g_traces:
            h.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def update_curvature_estimate(
    curvatures: list[Tensor],
    sampled_grads: list[Tensor],
    *,
    batch_size: int,
    rho: float,
    initialize: bool,
    foreach: bool,
) -> None:
    """Update the per-weight curvature estimates in place from sampled-label gradients.

    With ``initialize`` the estimate becomes ``B * g_s**2``. Otherwise it becomes the
    moving average ``rho * c + (1 - rho) * B * g_s**2``, where B is ``batch_size``.
    """
    if not curvatures:
        return
    kernel = _multi_tensor_curvature_update if foreach else _single_tensor_curvature_update
    kernel(curvatures, sampled_grads, batch_size=batch_size, rho=rho, initialize=initialize)


def _single_tensor_curvature_update(
    curvatures: list[Tensor],
    sampled_grads: list[Tensor],
    *,
    batch_size: int,
    rho: float,
    initialize: bool,
) -> None:
    for curvature, sampled_grad in zip(curvatures, sampled_grads, strict=True):
        if initialize:
            curvature.zero_().addcmul_(sampled_grad, sampled_grad, value=float(batch_size))
        else:
            curvature.mul_(rho).addcmul_(sampled_grad, sampled_grad, value=(1.0 - rho) * batch_size)


def _multi_tensor_curvature_update(
    curvatures: list[Tensor],
    sampled_grads: list[Tensor],
    *,
    batch_size: int,
    rho: float,
    initialize: bool,
) -> None:
    for group_curvatures, group_grads in _group_by_device_and_dtype([curvatures, sampled_grads]):
        if initialize:
            torch._foreach_zero_(group_curvatures)
            torch._foreach_addcmul_(
                group_curvatures, group_grads, group_grads, value=float(batch_size)
            )
        else:
            torch._foreach_mul_(group_curvatures, rho)
            torch._foreach_addcmul_(
                group_curvatures, group_grads, group_grads, value=(1.0 - rho) * batch_size
            )


def _step_size(
    log_lr: Tensor, log_alpha0: float, alpha0: float, alpha_min: float, alpha_max: float
) -> Tensor:
    """Compute alpha = exp(log_lr) as alpha0 * exp(log_lr - log(alpha0)).

    The two forms are equal in exact arithmetic. The second returns alpha0 exactly while
    log_lr is still at its initial value log(alpha0), which ``exp`` alone does not (in
    float64, ``exp(log(0.1))`` is 0.10000000000000002). The final clamp removes the
    last-bit rounding that can put ``exp(log(alpha_max))`` just above alpha_max.
    """
    alpha = torch.sub(log_lr, log_alpha0).exp_().mul_(alpha0)
    return alpha.clamp_(alpha_min, alpha_max)


def _foreach_step_sizes(
    log_lrs: list[Tensor], log_alpha0: float, alpha0: float, alpha_min: float, alpha_max: float
) -> list[Tensor]:
    alphas = torch._foreach_sub(log_lrs, log_alpha0)
    torch._foreach_exp_(alphas)
    torch._foreach_mul_(alphas, alpha0)
    torch._foreach_clamp_min_(alphas, alpha_min)
    torch._foreach_clamp_max_(alphas, alpha_max)
    return alphas


def step_sizes(
    log_lrs: Sequence[Tensor], *, alpha0: float, alpha_min: float, alpha_max: float
) -> list[Tensor]:
    """Return the per-weight step sizes alpha for the given log step sizes, as new tensors."""
    log_alpha0 = math.log(alpha0)
    return [_step_size(b, log_alpha0, alpha0, alpha_min, alpha_max) for b in log_lrs]


def _group_by_device_and_dtype(
    tensor_lists: list[list[Tensor] | None],
) -> list[list[list[Tensor] | None]]:
    """Split parallel tensor lists so that each part has one device and one dtype.

    Foreach ops need this. Grouping uses the first list, and a list given as None stays
    None in every part.
    """
    keys = [(t.device, t.dtype) for t in tensor_lists[0]]
    if len(set(keys)) == 1:
        return [tensor_lists]

    indices_by_key: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, key in enumerate(keys):
        indices_by_key.setdefault(key, []).append(i)

    parts = []
    for indices in indices_by_key.values():
        part = [None if lst is None else [lst[i] for i in indices] for lst in tensor_lists]
        parts.append(part)
    return parts
