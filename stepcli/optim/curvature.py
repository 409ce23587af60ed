"""Curvature products and the per-step backward pass for every optimizer.

All products use ``torch.autograd.grad``, never ``backward(create_graph=True)``, so no
graph is left attached to ``.grad`` and memory stays flat over many steps. Each
function frees the autograd graph it uses unless ``retain_graph=True``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from stepcli.optim.learned_step_size import LearnedStepSize

__all__ = ["backward_and_step", "ggn_vp", "hvp", "sampled_label_grads"]


def hvp(
    loss_or_grads: Tensor | Sequence[Tensor],
    params: Sequence[Tensor],
    vectors: Sequence[Tensor],
    *,
    retain_graph: bool = False,
) -> list[Tensor]:
    """Compute the exact Hessian-vector product H v of a scalar loss w.r.t. ``params``.

    ``loss_or_grads`` is either the scalar loss or its gradients w.r.t. ``params``
    computed with ``create_graph=True``. Passing the gradients avoids a second backward
    when the caller needs them too. Cost: one backward through the gradient graph,
    about twice a plain backward. Parameters that the loss does not depend on get zeros.
    """
    params = list(params)
    vectors = list(vectors)
    _check_same_length(params, vectors, "vectors")

    if isinstance(loss_or_grads, Tensor):
        if loss_or_grads.dim() != 0:
            raise ValueError(
                f"invalid loss of shape {tuple(loss_or_grads.shape)}: must be a scalar"
            )
        grads = torch.autograd.grad(
            loss_or_grads, params, create_graph=True, materialize_grads=True
        )
    else:
        grads = list(loss_or_grads)
        _check_same_length(params, grads, "grads")

    # A gradient without a graph is constant in the parameters, so its rows of H are 0.
    connected = [(g, v) for g, v in zip(grads, vectors, strict=True) if g.requires_grad]
    if not connected:
        return [torch.zeros_like(p) for p in params]
    products = torch.autograd.grad(
        [g for g, _ in connected],
        params,
        grad_outputs=[v for _, v in connected],
        retain_graph=retain_graph,
        materialize_grads=True,
    )
    return list(products)


def ggn_vp(
    logits: Tensor,
    params: Sequence[Tensor],
    vectors: Sequence[Tensor],
    *,
    retain_graph: bool = False,
) -> list[Tensor]:
    """Compute the Gauss-Newton product J^T H_out J v for the mean cross-entropy.

    ``logits`` has shape (B, K) and J is its Jacobian w.r.t. ``params``. H_out is the
    Hessian of the mean cross-entropy w.r.t. the logits, (diag(p) - p p^T) / B for each
    example, with p = softmax(logits), and it does not depend on the labels. J is never
    materialised. Cost: three backward passes through the logits graph, one of them
    building a graph of its own.
    """
    _check_logits(logits)
    params = list(params)
    vectors = list(vectors)
    _check_same_length(params, vectors, "vectors")

    # J v by the double-backward trick: J^T u is linear in the dummy u, so the gradient
    # of <J^T u, v> w.r.t. u is J v. The value of u does not matter.
    dummy = torch.zeros_like(logits, requires_grad=True)
    jacobian_t_dummy = torch.autograd.grad(
        logits, params, grad_outputs=dummy, create_graph=True, materialize_grads=True
    )
    connected = [(j, v) for j, v in zip(jacobian_t_dummy, vectors, strict=True) if j.requires_grad]
    if not connected:
        return [torch.zeros_like(p) for p in params]
    (jacobian_v,) = torch.autograd.grad(
        [j for j, _ in connected], dummy, grad_outputs=[v for _, v in connected]
    )

    with torch.no_grad():
        probs = torch.softmax(logits.detach(), dim=-1)
        # (diag(p) - p p^T) u = p * (u - <p, u>), per example.
        projected = (probs * jacobian_v).sum(dim=-1, keepdim=True)
        output_product = probs * (jacobian_v - projected) / logits.shape[0]

    products = torch.autograd.grad(
        logits,
        params,
        grad_outputs=output_product,
        retain_graph=retain_graph,
        materialize_grads=True,
    )
    return list(products)


def sampled_label_grads(
    logits: Tensor,
    params: Sequence[Tensor],
    generator: torch.Generator | None = None,
    *,
    retain_graph: bool = False,
) -> list[Tensor]:
    """Compute gradients of the mean cross-entropy against labels sampled from the model.

    One label per example is drawn from softmax(logits), and the gradient w.r.t.
    ``params`` is one extra backward through the existing logits graph, with no second
    forward pass. ``generator`` makes the draw reproducible and must be on the device of
    ``logits``. B * g_s**2 is an unbiased estimate of the diagonal of the Gauss-Newton
    matrix of the mean loss, because the score has zero mean under the model's own
    labels, so the cross terms between examples vanish.
    """
    _check_logits(logits)
    params = list(params)
    with torch.no_grad():
        probs = torch.softmax(logits.detach(), dim=-1)
        labels = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
    sampled_loss = F.cross_entropy(logits, labels)
    grads = torch.autograd.grad(
        sampled_loss, params, retain_graph=retain_graph, materialize_grads=True
    )
    return list(grads)


def backward_and_step(
    optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor],
    loss: Tensor,
    logits: Tensor,
    generator: torch.Generator | None = None,
) -> None:
    """Run the backward passes one training step needs, then ``optimizer.step()``.

    This calls ``optimizer.zero_grad(set_to_none=True)`` first, so the caller need not.
    ``loss`` is the mean cross-entropy of ``logits`` (shape (B, K)) on the batch, and
    ``params`` are the optimizer's parameters in its order.

    * Any other optimizer (Adam, SGD) and ``LearnedStepSize(trace="gradient")``:
      ``loss.backward()``, then ``step()``.
    * ``trace="decay"``: when ``optimizer.curvature_due()``, the loss gradients and the
      sampled-label gradients of the same logits (one extra backward, labels drawn with
      ``generator``) update the curvature before ``step()``. Otherwise as above.
    * ``trace="hvp"``: the loss gradients and the product C h with the optimizer's
      traces, C being the Hessian or the Gauss-Newton matrix, then ``step(hvp=...)``.

    The autograd graph of ``loss`` is freed on return.
    """
    optimizer.zero_grad(set_to_none=True)
    if not isinstance(optimizer, LearnedStepSize) or optimizer.trace_rule == "gradient":
        loss.backward()
        optimizer.step()
        return

    params = list(params)
    _check_optimizer_params(optimizer, params)

    if optimizer.trace_rule == "decay":
        if optimizer.curvature_due():
            grads = torch.autograd.grad(loss, params, retain_graph=True, materialize_grads=True)
            sampled = sampled_label_grads(logits, params, generator)
            _set_grads(params, grads)
            optimizer.update_curvature(sampled, batch_size=logits.shape[0])
        else:
            loss.backward()
        optimizer.step()
        return

    traces = optimizer.traces()
    if optimizer.curvature_product == "hessian":
        grads = torch.autograd.grad(loss, params, create_graph=True, materialize_grads=True)
        products = hvp(grads, params, traces)
    else:
        grads = torch.autograd.grad(loss, params, retain_graph=True, materialize_grads=True)
        products = ggn_vp(logits, params, traces)
    _set_grads(params, grads)
    optimizer.step(hvp=products)


def _set_grads(params: list[Tensor], grads: Sequence[Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g.detach()


def _check_optimizer_params(optimizer: LearnedStepSize, params: list[Tensor]) -> None:
    expected = [p for group in optimizer.param_groups for p in group["params"]]
    same = len(params) == len(expected) and all(
        p is q for p, q in zip(params, expected, strict=False)
    )
    if not same:
        raise ValueError(
            "invalid params: must be the optimizer's parameters in its order "
            f"(got {len(params)} tensors, the optimizer has {len(expected)})"
        )


def _check_logits(logits: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"invalid logits of shape {tuple(logits.shape)}: must be (batch, classes)")


def _check_same_length(params: list[Tensor], tensors: Sequence[Tensor], name: str) -> None:
    if len(tensors) != len(params):
        raise ValueError(f"invalid {name}: got {len(tensors)} tensors for {len(params)} parameters")
