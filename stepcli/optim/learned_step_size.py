"""SGD with one learned step size per weight, adapted by a sign-of-momentum meta-step."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from stepcli.optim.functional import (
    TRACE_RULES,
    learned_step_size,
    step_sizes,
    update_curvature_estimate,
)

__all__ = ["LearnedStepSize"]

CURVATURE_PRODUCTS = ("hessian", "ggn")

# Hyperparameters that decide which state and which extra backward passes the optimizer
# needs. They are stored in every param group, like the others, but must be the same in
# all groups, and a saved state loads only into an optimizer with the same values.
_SHARED_HYPERPARAMETERS = ("trace", "curvature", "curvature_every")


class LearnedStepSize(torch.optim.Optimizer):
    r"""SGD with a learned step size per weight.

    Each weight :math:`\theta` has a log step size :math:`\beta = \log\alpha` (state
    ``log_lr``), a sensitivity trace :math:`h \approx d\theta/d\beta` (state ``trace``)
    and a meta-momentum :math:`m` (state ``meta_momentum``). With minibatch gradient
    :math:`g`, one step is, elementwise:

    .. math::
        z &= g\,h \qquad (\approx -\partial L/\partial\beta) \\
        s &= \operatorname{sign}(c\,m + (1-c)\,z) \qquad (\text{uses the old } m) \\
        m &\leftarrow b\,m + (1-b)\,z \\
        \beta &\leftarrow \operatorname{clamp}(\beta + \mu s,\ \log\alpha_{min},
            \ \log\alpha_{max}) \\
        \alpha &= e^{\beta} \\
        \theta &\leftarrow \theta - \alpha g \\
        h &\leftarrow \text{trace rule with the new } \alpha

    The trace rules are:

    * ``"gradient"``: :math:`h \leftarrow \gamma h + \alpha g`.
    * ``"decay"``: :math:`h \leftarrow \gamma d h + \alpha g` with
      :math:`d = \operatorname{clamp}(1 - \alpha \hat c, 0, 1)`. The curvature
      :math:`\hat c` (state ``curvature``) starts at 0, so the rule equals ``"gradient"``
      until the first estimate. Every ``curvature_every`` steps the caller passes
      sampled-label gradients :math:`g_s` to :meth:`update_curvature`. The first estimate
      sets :math:`\hat c = B g_s^2`, and later ones set
      :math:`\hat c \leftarrow \rho \hat c + (1-\rho) B g_s^2`.
    * ``"hvp"``: :math:`h \leftarrow \gamma (h - \alpha\, C h) + \alpha g`, where the caller
      passes :math:`C h` to :meth:`step`. C is the Hessian (``curvature="hessian"``) or
      the Gauss-Newton matrix (``curvature="ggn"``) of the loss on the current batch at
      the weights before the update, and h is the trace before this step's update.

    Wherever the new trace is not finite, it is reset to 0. At :math:`\mu = 0` the step
    size stays :math:`\alpha_0` exactly, so the optimizer is SGD with learning rate
    :math:`\alpha_0`. :func:`stepcli.optim.backward_and_step` computes the extra
    gradients and products that ``"decay"`` and ``"hvp"`` need.

    The state tensors have the parameter's dtype.

    NOTE: in bfloat16 the spacing of ``log_lr`` values near log(0.1) is 2**-6, so a
    ``meta_lr`` below about 0.008 rounds to no change.

    Args:
        params: parameters or param groups to optimize.
        alpha0: initial step size :math:`\alpha_0`.
        meta_lr: meta step size :math:`\mu` on :math:`\log\alpha`. 0 keeps
            :math:`\alpha = \alpha_0`.
        alpha_min, alpha_max: bounds on the step size.
        gamma: trace decay :math:`\gamma`, in [0, 1].
        meta_momentum: meta-momentum coefficient :math:`b`, in [0, 1).
        sign_mix: weight :math:`c` of the meta-momentum in the meta-step sign, in [0, 1].
        trace: trace rule, ``"gradient"``, ``"decay"`` or ``"hvp"``.
        curvature_every: steps k between curvature estimates for ``trace="decay"``.
        curvature_rho: moving-average coefficient :math:`\rho` of the curvature estimate.
        curvature: curvature matrix C for ``trace="hvp"``, ``"hessian"`` or ``"ggn"``.
        foreach: use the foreach kernel. None selects it when all parameters are dense
            and on one device type.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        alpha0: float = 0.1,
        meta_lr: float = 0.1,
        alpha_min: float = 1e-6,
        alpha_max: float = 3.0,
        gamma: float = 0.99,
        meta_momentum: float = 0.99,
        sign_mix: float = 0.9,
        trace: str = "gradient",
        curvature_every: int = 10,
        curvature_rho: float = 0.99,
        curvature: str = "hessian",
        foreach: bool | None = None,
    ) -> None:
        defaults = {
            "alpha0": alpha0,
            "meta_lr": meta_lr,
            "alpha_min": alpha_min,
            "alpha_max": alpha_max,
            "gamma": gamma,
            "meta_momentum": meta_momentum,
            "sign_mix": sign_mix,
            "trace": trace,
            "curvature_every": curvature_every,
            "curvature_rho": curvature_rho,
            "curvature": curvature,
            "foreach": foreach,
        }
        _validate_hyperparameters(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group after checking its hyperparameters and parameter dtypes."""
        hyperparameters = {**self.defaults}
        hyperparameters.update({k: v for k, v in param_group.items() if k != "params"})
        _validate_hyperparameters(hyperparameters)
        # The optimizer runs one kernel for all groups, so foreach is shared too.
        for key in (*_SHARED_HYPERPARAMETERS, "foreach"):
            if hyperparameters[key] != self.defaults[key]:
                raise ValueError(
                    f"invalid {key} {hyperparameters[key]!r} in a param group: every group "
                    f"must use the optimizer's {key} {self.defaults[key]!r}"
                )

        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if not p.is_floating_point():
                self.param_groups.pop()
                raise ValueError(
                    f"invalid parameter dtype {p.dtype}: LearnedStepSize supports real "
                    "floating-point parameters only"
                )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by ``state_dict()`` of an optimizer with the same trace rule."""
        for saved_group in state_dict["param_groups"]:
            for key in _SHARED_HYPERPARAMETERS:
                if key in saved_group and saved_group[key] != self.defaults[key]:
                    raise ValueError(
                        f"cannot load a state saved with {key}={saved_group[key]!r} into an "
                        f"optimizer with {key}={self.defaults[key]!r}"
                    )
        super().load_state_dict(state_dict)

    @property
    def trace_rule(self) -> str:
        """Trace rule: ``"gradient"``, ``"decay"`` or ``"hvp"``."""
        return self.defaults["trace"]

    @property
    def curvature_product(self) -> str:
        """Curvature matrix used by ``trace="hvp"``: ``"hessian"`` or ``"ggn"``."""
        return self.defaults["curvature"]

    @property
    def needs_hvp(self) -> bool:
        """Whether :meth:`step` requires the curvature-vector products ``hvp``."""
        return self.trace_rule == "hvp"

    @property
    def implementation(self) -> str:
        """Kernel that :meth:`step` runs: ``"foreach"`` or ``"single_tensor"``."""
        return "foreach" if self._use_foreach() else "single_tensor"

    def curvature_due(self) -> bool:
        """Return whether the next step should refresh the curvature estimate.

        True for ``trace="decay"`` when the number of ``step()`` calls so far is a
        multiple of ``curvature_every``, so also before the first step.
        """
        if self.trace_rule != "decay":
            return False
        return self._steps_taken() % self.defaults["curvature_every"] == 0

    @torch.no_grad()
    def update_curvature(self, sampled_grads: Sequence[Tensor], batch_size: int) -> None:
        """Update the curvature estimate from sampled-label gradients of one batch.

        ``sampled_grads`` contains one gradient per parameter in parameter order, of the
        mean cross-entropy against labels sampled from the model's own predictions
        (see :func:`stepcli.optim.sampled_label_grads`). ``batch_size`` is the number
        of examples B in that mean.
        """
        if self.trace_rule != "decay":
            raise RuntimeError(
                "update_curvature() requires trace='decay', but this optimizer uses "
                f"trace={self.trace_rule!r}"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"invalid batch_size {batch_size!r}: must be an int >= 1")
        sampled_grads = self._per_parameter(sampled_grads, "sampled_grads")

        foreach = self._use_foreach()
        index = 0
        for group in self.param_groups:
            first_curvatures, first_grads, curvatures, grads = [], [], [], []
            for p in group["params"]:
                sampled_grad = sampled_grads[index]
                index += 1
                state = self._state_for(p, group)
                if state["curvature_updates"] == 0:
                    first_curvatures.append(state["curvature"])
                    first_grads.append(sampled_grad)
                else:
                    curvatures.append(state["curvature"])
                    grads.append(sampled_grad)
                state["curvature_updates"] += 1

            rho = group["curvature_rho"]
            update_curvature_estimate(
                first_curvatures,
                first_grads,
                batch_size=batch_size,
                rho=rho,
                initialize=True,
                foreach=foreach,
            )
            update_curvature_estimate(
                curvatures, grads, batch_size=batch_size, rho=rho, initialize=False, foreach=foreach
            )

    @torch.no_grad()
    def step(self, closure=None, *, hvp: Sequence[Tensor] | None = None):
        """Perform one optimization step with the gradients in ``p.grad``.

        ``hvp`` is required for ``trace="hvp"`` and rejected otherwise. It contains the
        products C h, one per parameter in parameter order, computed with the traces
        from :meth:`traces` before this call. Parameters whose ``grad`` is None are
        skipped. Returns the closure's loss, or None without a closure.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        if self.needs_hvp and hvp is None:
            raise ValueError(
                "trace='hvp' requires hvp: pass the curvature-vector products C h, "
                "for example from stepcli.optim.backward_and_step"
            )
        if not self.needs_hvp and hvp is not None:
            raise ValueError(f"hvp was given, but trace={self.trace_rule!r} does not use it")
        products = None if hvp is None else self._per_parameter(hvp, "hvp")

        foreach = self._use_foreach()
        index = 0
        for group in self.param_groups:
            params, grads, log_lrs, traces, momenta = [], [], [], [], []
            curvatures = [] if self.trace_rule == "decay" else None
            group_products = [] if products is not None else None

            for p in group["params"]:
                product = None if products is None else products[index]
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LearnedStepSize does not support sparse gradients")

                state = self._state_for(p, group)
                params.append(p)
                grads.append(p.grad)
                log_lrs.append(state["log_lr"])
                traces.append(state["trace"])
                momenta.append(state["meta_momentum"])
                if curvatures is not None:
                    curvatures.append(state["curvature"])
                if group_products is not None:
                    group_products.append(product)
                state["step"] += 1

            learned_step_size(
                params,
                grads,
                log_lrs,
                traces,
                momenta,
                curvatures,
                group_products,
                foreach=foreach,
                alpha0=group["alpha0"],
                alpha_min=group["alpha_min"],
                alpha_max=group["alpha_max"],
                meta_lr=group["meta_lr"],
                gamma=group["gamma"],
                meta_momentum=group["meta_momentum"],
                sign_mix=group["sign_mix"],
                trace=group["trace"],
            )
        return loss

    def traces(self) -> list[Tensor]:
        """Return the trace h of every parameter, in parameter order.

        These are the live state tensors, which :meth:`step` updates in place, so
        compute the products C h from them before calling :meth:`step`.
        """
        return [self._state_for(p, group)["trace"] for group, p in self._groups_and_params()]

    def step_sizes(self) -> list[Tensor]:
        """Return the step sizes alpha of every parameter, in parameter order, as new tensors."""
        alphas = []
        for group, p in self._groups_and_params():
            (alpha,) = step_sizes(
                [self._state_for(p, group)["log_lr"]],
                alpha0=group["alpha0"],
                alpha_min=group["alpha_min"],
                alpha_max=group["alpha_max"],
            )
            alphas.append(alpha)
        return alphas

    def budget(self) -> dict[str, int]:
        """Count the per-weight state entries, by role.

        ``step_sizes`` counts the learned log step sizes, ``decays`` the curvature
        entries that set the trace decay (0 unless ``trace="decay"``), and
        ``auxiliary`` the trace and meta-momentum entries.
        """
        numel = sum(p.numel() for _, p in self._groups_and_params())
        return {
            "step_sizes": numel,
            "decays": numel if self.trace_rule == "decay" else 0,
            "auxiliary": 2 * numel,
        }

    @torch.no_grad()
    def diagnostics(
        self, quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95)
    ) -> list[dict[str, Any]]:
        """Summarise the per-weight step sizes, and curvature and decay for ``trace="decay"``.

        Returns one dict per parameter and quantity, in parameter order, with keys
        ``param_index``, ``quantity``, ``quantiles`` ({q: value}, linear interpolation),
        ``frac_at_min`` and ``frac_at_max``. For ``"step_size"`` the fractions count
        weights whose log step size is at log(alpha_min) or log(alpha_max). For
        ``"decay"`` (the factor d) they count weights at d = 0 and d = 1. For
        ``"curvature"`` they are None. This reads values back to the host, so it
        synchronises with the device.
        """
        for q in quantiles:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"invalid quantile {q!r}: must be in [0, 1]")

        rows: list[dict[str, Any]] = []
        for index, (group, p) in enumerate(self._groups_and_params()):
            state = self._state_for(p, group)
            log_lr = state["log_lr"]
            (alpha,) = step_sizes(
                [log_lr],
                alpha0=group["alpha0"],
                alpha_min=group["alpha_min"],
                alpha_max=group["alpha_max"],
            )
            rows.append(
                _summary(
                    index,
                    "step_size",
                    alpha,
                    quantiles,
                    at_min=log_lr <= math.log(group["alpha_min"]),
                    at_max=log_lr >= math.log(group["alpha_max"]),
                )
            )
            if self.trace_rule == "decay":
                curvature = state["curvature"]
                decay = torch.mul(alpha, curvature).neg_().add_(1.0).clamp_(0.0, 1.0)
                rows.append(_summary(index, "curvature", curvature, quantiles))
                rows.append(
                    _summary(index, "decay", decay, quantiles, at_min=decay <= 0, at_max=decay >= 1)
                )
        return rows

    def _groups_and_params(self) -> list[tuple[dict[str, Any], Tensor]]:
        return [(group, p) for group in self.param_groups for p in group["params"]]

    def _per_parameter(self, tensors: Sequence[Tensor], name: str) -> list[Tensor]:
        """Check that ``tensors`` has one tensor per parameter with the parameter's shape."""
        tensors = list(tensors)
        params = [p for _, p in self._groups_and_params()]
        if len(tensors) != len(params):
            raise ValueError(
                f"invalid {name}: got {len(tensors)} tensors for {len(params)} parameters"
            )
        for i, (tensor, p) in enumerate(zip(tensors, params, strict=True)):
            if tensor.shape != p.shape:
                raise ValueError(
                    f"invalid {name}[{i}]: shape {tuple(tensor.shape)} does not match the "
                    f"parameter shape {tuple(p.shape)}"
                )
        return tensors

    def _state_for(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """Return the state of ``p``, creating it at its initial values on first use."""
        state = self.state[p]
        if len(state) == 0:
            # Python ints, so that counting steps never touches the device.
            state["step"] = 0
            state["log_lr"] = torch.full_like(
                p, math.log(group["alpha0"]), memory_format=torch.preserve_format
            )
            state["trace"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["meta_momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if self.trace_rule == "decay":
                state["curvature_updates"] = 0
                state["curvature"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _steps_taken(self) -> int:
        steps = [self.state[p]["step"] for _, p in self._groups_and_params() if self.state[p]]
        return max(steps, default=0)

    def _use_foreach(self) -> bool:
        foreach = self.defaults["foreach"]
        if foreach is not None:
            return foreach
        params = [p for _, p in self._groups_and_params()]
        dense = all(p.layout == torch.strided for p in params)
        return dense and len({p.device.type for p in params}) == 1


def _validate_hyperparameters(hyperparameters: dict[str, Any]) -> None:
    """Raise ValueError naming the first hyperparameter that is out of its bounds."""
    h = hyperparameters
    for name in (
        "alpha0",
        "meta_lr",
        "alpha_min",
        "alpha_max",
        "gamma",
        "meta_momentum",
        "sign_mix",
        "curvature_rho",
    ):
        value = h[name]
        is_real = isinstance(value, Real) and not isinstance(value, bool)
        if not is_real or not math.isfinite(value):
            raise ValueError(f"invalid {name} {value!r}: must be a finite real number")

    _require(h["alpha_min"] > 0, "alpha_min", h["alpha_min"], "> 0")
    _require(
        h["alpha_max"] >= h["alpha_min"],
        "alpha_max",
        h["alpha_max"],
        f">= alpha_min {h['alpha_min']!r}",
    )
    _require(h["alpha0"] > 0, "alpha0", h["alpha0"], "> 0")
    _require(
        h["alpha0"] >= h["alpha_min"], "alpha0", h["alpha0"], f">= alpha_min {h['alpha_min']!r}"
    )
    _require(
        h["alpha0"] <= h["alpha_max"], "alpha0", h["alpha0"], f"<= alpha_max {h['alpha_max']!r}"
    )
    _require(h["meta_lr"] >= 0, "meta_lr", h["meta_lr"], ">= 0")
    _require(0 <= h["gamma"] <= 1, "gamma", h["gamma"], "in [0, 1]")
    _require(0 <= h["meta_momentum"] < 1, "meta_momentum", h["meta_momentum"], "in [0, 1)")
    _require(0 <= h["sign_mix"] <= 1, "sign_mix", h["sign_mix"], "in [0, 1]")
    _require(0 <= h["curvature_rho"] < 1, "curvature_rho", h["curvature_rho"], "in [0, 1)")

    rules = ", ".join(repr(rule) for rule in TRACE_RULES)
    _require(h["trace"] in TRACE_RULES, "trace", h["trace"], f"one of {rules}")
    products = ", ".join(repr(product) for product in CURVATURE_PRODUCTS)
    _require(
        h["curvature"] in CURVATURE_PRODUCTS, "curvature", h["curvature"], f"one of {products}"
    )

    every = h["curvature_every"]
    is_int = isinstance(every, int) and not isinstance(every, bool)
    _require(is_int and every >= 1, "curvature_every", every, "an int >= 1")
    _require(h["foreach"] in (None, True, False), "foreach", h["foreach"], "None, True or False")


def _require(condition: bool, name: str, value: Any, bound: str) -> None:
    if not condition:
        raise ValueError(f"invalid {name} {value!r}: must be {bound}")


def _summary(
    param_index: int,
    quantity: str,
    values: Tensor,
    quantiles: Sequence[float],
    at_min: Tensor | None = None,
    at_max: Tensor | None = None,
) -> dict[str, Any]:
    """Build one diagnostics row from ``values`` and boolean masks of the bounds."""
    flat = values.detach().flatten().double()
    quantile_values = _quantiles(flat, quantiles)

    frac_at_min = None
    frac_at_max = None
    if at_min is not None:
        frac_at_min = at_min.double().mean().item()
    if at_max is not None:
        frac_at_max = at_max.double().mean().item()
    return {
        "param_index": param_index,
        "quantity": quantity,
        "quantiles": quantile_values,
        "frac_at_min": frac_at_min,
        "frac_at_max": frac_at_max,
    }


def _quantiles(flat: Tensor, quantiles: Sequence[float]) -> dict[float, float]:
    """Compute quantiles with linear interpolation, reading them back in one transfer."""
    if flat.numel() == 0:
        return {q: math.nan for q in quantiles}
    levels = torch.tensor(list(quantiles), dtype=flat.dtype, device=flat.device)
    values = torch.quantile(flat, levels, interpolation="linear").tolist()
    return dict(zip(quantiles, values, strict=True))
