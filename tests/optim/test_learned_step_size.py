"""Tests of the LearnedStepSize update rules, kernels, state and validation."""

import copy
import math

import pytest
import torch

from stepcli.optim import LearnedStepSize

KERNELS = [True, False]
RULES = ["gradient", "decay", "hvp"]

# One step from a hand-set state, shared by the three by-hand tests. Three weights with
# alpha0 = 0.1, meta_lr = 0.1 and the defaults b = 0.99, c = 0.9, gamma = 0.99:
#   theta = [1.0, -2.0, 0.5], g = [0.5, -1.0, 1.7], h = [0.2, 0.3, -0.5], m = [0.01, -0.5, 0.1]
#   z = g * h = [0.1, -0.3, -0.85]
#   c m + (1-c) z = [0.019, -0.48, 0.005], so s = [+1, -1, +1]
# The third weight checks that s uses the old m: with the new m = 0.0905 the mix would be
# 0.9 * 0.0905 - 0.085 < 0.
#   m = b m + (1 - b) z = [0.0109, -0.498, 0.0905]
#   alpha = 0.1 * exp(0.1 * s)
#         = [0.11051709180756478, 0.09048374180359596, 0.11051709180756478]
#   alpha * g = [0.05525854590378239, -0.09048374180359596, 0.18787905607286012]
#   theta - alpha * g = [0.9447414540962176, -1.909516258196404, 0.31212094392713985]
THETA = [1.0, -2.0, 0.5]
GRAD = [0.5, -1.0, 1.7]
TRACE = [0.2, 0.3, -0.5]
META_MOMENTUM = [0.01, -0.5, 0.1]
EXPECTED_META_MOMENTUM = [0.0109, -0.498, 0.0905]
EXPECTED_ALPHA = [0.11051709180756478, 0.09048374180359596, 0.11051709180756478]
EXPECTED_THETA = [0.9447414540962176, -1.909516258196404, 0.31212094392713985]


def _tensor(values):
    return torch.tensor(values, dtype=torch.float64)


def _hand_set_optimizer(trace, foreach, **kwargs):
    param = torch.nn.Parameter(_tensor(THETA))
    optimizer = LearnedStepSize(
        [param], alpha0=0.1, meta_lr=0.1, trace=trace, foreach=foreach, **kwargs
    )
    optimizer.traces()  # creates the state at its initial values
    state = optimizer.state[param]
    state["trace"].copy_(_tensor(TRACE))
    state["meta_momentum"].copy_(_tensor(META_MOMENTUM))
    param.grad = _tensor(GRAD)
    return param, optimizer


def _assert_close(actual, expected):
    torch.testing.assert_close(actual, _tensor(expected), rtol=1e-12, atol=1e-15)


def _assert_shared_core(param, optimizer):
    state = optimizer.state[param]
    _assert_close(state["meta_momentum"], EXPECTED_META_MOMENTUM)
    _assert_close(state["log_lr"], [math.log(a) for a in EXPECTED_ALPHA])
    _assert_close(optimizer.step_sizes()[0], EXPECTED_ALPHA)
    _assert_close(param.detach(), EXPECTED_THETA)


@pytest.mark.parametrize("foreach", KERNELS)
def test_gradient_rule_one_step_by_hand(foreach):
    param, optimizer = _hand_set_optimizer("gradient", foreach)
    optimizer.step()

    _assert_shared_core(param, optimizer)
    # h = gamma h + alpha g = [0.198 + 0.05525854590378239, 0.297 - 0.09048374180359596,
    #                          -0.495 + 0.18787905607286012]
    _assert_close(
        optimizer.traces()[0], [0.2532585459037824, 0.206516258196404, -0.30712094392713984]
    )


@pytest.mark.parametrize("foreach", KERNELS)
def test_decay_rule_one_step_by_hand(foreach):
    param, optimizer = _hand_set_optimizer("decay", foreach)
    # First estimate: curvature = B g_s^2 = 2 * [1, 9, 0.25] = [2, 18, 0.5].
    optimizer.update_curvature([_tensor([1.0, 3.0, 0.5])], batch_size=2)
    _assert_close(optimizer.state[param]["curvature"], [2.0, 18.0, 0.5])
    optimizer.step()

    _assert_shared_core(param, optimizer)
    # alpha * curvature = [0.22103418361512955, 1.6287073524647273, 0.05525854590378239]
    # d = clamp(1 - alpha * curvature, 0, 1) = [0.7789658163848705, 0, 0.9447414540962176]
    # h = gamma d h + alpha g = [0.99 * 0.7789658163848705 * 0.2 + 0.05525854590378239,
    #                            0 - 0.09048374180359596,
    #                            0.99 * 0.9447414540962176 * -0.5 + 0.18787905607286012]
    expected_trace = [0.20949377754798676, -0.09048374180359596, -0.27976796370476753]
    _assert_close(optimizer.traces()[0], expected_trace)


@pytest.mark.parametrize("foreach", KERNELS)
def test_hvp_rule_one_step_by_hand(foreach):
    param, optimizer = _hand_set_optimizer("hvp", foreach)
    optimizer.step(hvp=[_tensor([0.6, -1.0, 2.0])])

    _assert_shared_core(param, optimizer)
    # alpha * Ch = [0.06631025508453886, 0.09048374180359596, 0.22103418361512955]
    # h = gamma (h - alpha Ch) + alpha g
    #   = [0.99 * (0.2 - 0.06631025508453886) + 0.05525854590378239,
    #      0.99 * (0.3 + 0.09048374180359596) - 0.09048374180359596,
    #      0.99 * (-0.5 - 0.22103418361512955) + 0.18787905607286012]
    _assert_close(
        optimizer.traces()[0], [0.18761139337008892, 0.296095162581964, -0.525944785706118]
    )


@pytest.mark.parametrize("foreach", KERNELS)
def test_curvature_update_by_hand(foreach):
    param = torch.nn.Parameter(_tensor([0.0, 0.0]))
    optimizer = LearnedStepSize([param], trace="decay", curvature_rho=0.9, foreach=foreach)

    optimizer.update_curvature([_tensor([2.0, -1.0])], batch_size=4)
    # First estimate: 4 * [4, 1].
    _assert_close(optimizer.state[param]["curvature"], [16.0, 4.0])

    optimizer.update_curvature([_tensor([1.0, 0.5])], batch_size=4)
    # 0.9 * [16, 4] + 0.1 * 4 * [1, 0.25] = [14.4 + 0.4, 3.6 + 0.1]
    _assert_close(optimizer.state[param]["curvature"], [14.8, 3.7])


def test_first_step_keeps_step_size():
    # h0 = m0 = 0 makes z = 0 and sign(0) = 0, so the first step is SGD with alpha0.
    param = torch.nn.Parameter(_tensor(THETA))
    optimizer = LearnedStepSize([param], alpha0=0.5, meta_lr=0.1)
    param.grad = _tensor(GRAD)
    optimizer.step()

    assert torch.equal(optimizer.step_sizes()[0], torch.full((3,), 0.5, dtype=torch.float64))
    _assert_close(param.detach(), [1.0 - 0.25, -2.0 + 0.5, 0.5 - 0.85])


def _make_params(dtypes=(torch.float64, torch.float64, torch.float64)):
    generator = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (3,), (2, 2, 2)]
    return [
        torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype))
        for shape, dtype in zip(shapes, dtypes, strict=True)
    ]


def _run_steps(params, optimizer, steps, seed=1):
    """Take ``steps`` steps with random gradients, products and curvature estimates."""
    generator = torch.Generator().manual_seed(seed)

    def like(p, scale=1.0):
        return scale * torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype)

    for _ in range(steps):
        for p in params:
            p.grad = like(p)
        if optimizer.curvature_due():
            optimizer.update_curvature([like(p, 3.0) for p in params], batch_size=8)
        if optimizer.needs_hvp:
            optimizer.step(hvp=[like(p) for p in params])
        else:
            optimizer.step()


def _assert_same_state(params_a, optimizer_a, params_b, optimizer_b, rtol=1e-12, atol=1e-12):
    for a, b in zip(params_a, params_b, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol)
        state_a = optimizer_a.state[a]
        state_b = optimizer_b.state[b]
        assert state_a.keys() == state_b.keys()
        for key, value in state_a.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, state_b[key], rtol=rtol, atol=atol)
            else:
                assert value == state_b[key], key


@pytest.mark.parametrize("trace", RULES)
def test_foreach_matches_single_tensor(trace):
    params_foreach = _make_params()
    params_single = _make_params()
    kwargs = {"trace": trace, "curvature_every": 2, "meta_lr": 0.05, "alpha0": 0.05}
    foreach = LearnedStepSize(params_foreach, foreach=True, **kwargs)
    single = LearnedStepSize(params_single, foreach=False, **kwargs)
    assert foreach.implementation == "foreach"
    assert single.implementation == "single_tensor"

    _run_steps(params_foreach, foreach, steps=8)
    _run_steps(params_single, single, steps=8)

    _assert_same_state(params_foreach, foreach, params_single, single)
    # The meta-step must have moved the step sizes, or the comparison proves little.
    assert not torch.allclose(single.step_sizes()[0], torch.full((4, 3), 0.05, dtype=torch.float64))


@pytest.mark.parametrize("trace", RULES)
def test_foreach_bit_identical_in_float64(trace):
    # On the CPU both kernels run the same per-tensor ops in the same order, so every state
    # tensor must match exactly, not only to rounding.
    params_foreach = _make_params()
    params_single = _make_params()
    kwargs = {"trace": trace, "curvature_every": 2, "meta_lr": 0.05, "alpha0": 0.05}
    foreach = LearnedStepSize(params_foreach, foreach=True, **kwargs)
    single = LearnedStepSize(params_single, foreach=False, **kwargs)

    _run_steps(params_foreach, foreach, steps=8)
    _run_steps(params_single, single, steps=8)

    for a, b in zip(params_foreach, params_single, strict=True):
        assert torch.equal(a, b)
        for key, value in foreach.state[a].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, single.state[b][key]), key


def test_foreach_matches_single_tensor_mixed_dtypes():
    dtypes = (torch.float32, torch.float64, torch.float32)
    params_foreach = _make_params(dtypes)
    params_single = _make_params(dtypes)
    foreach = LearnedStepSize(params_foreach, trace="decay", curvature_every=3, foreach=True)
    single = LearnedStepSize(params_single, trace="decay", curvature_every=3, foreach=False)

    _run_steps(params_foreach, foreach, steps=6)
    _run_steps(params_single, single, steps=6)

    _assert_same_state(params_foreach, foreach, params_single, single, rtol=1e-6, atol=1e-6)
    assert foreach.state[params_foreach[0]]["log_lr"].dtype == torch.float32


def test_decay_without_estimate_equals_gradient():
    params_decay = _make_params()
    params_gradient = _make_params()
    decay = LearnedStepSize(params_decay, trace="decay")
    gradient = LearnedStepSize(params_gradient, trace="gradient")

    # Without update_curvature() the curvature stays 0, so the decay d is 1.
    generator_a = torch.Generator().manual_seed(5)
    generator_b = torch.Generator().manual_seed(5)
    for _ in range(5):
        for p in params_decay:
            p.grad = torch.randn(p.shape, generator=generator_a, dtype=torch.float64)
        for p in params_gradient:
            p.grad = torch.randn(p.shape, generator=generator_b, dtype=torch.float64)
        decay.step()
        gradient.step()

    for a, b in zip(params_decay, params_gradient, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(decay.state[a]["trace"], gradient.state[b]["trace"])


@pytest.mark.parametrize("foreach", KERNELS)
def test_step_sizes_stay_within_bounds(foreach):
    params = _make_params()
    optimizer = LearnedStepSize(
        params, alpha0=0.01, meta_lr=1e3, alpha_min=1e-4, alpha_max=0.5, foreach=foreach
    )
    # Random gradients give z of both signs, so a meta_lr this large sends weights to
    # both bounds from the second step on.
    _run_steps(params, optimizer, steps=12)

    alphas = torch.cat([a.flatten() for a in optimizer.step_sizes()])
    assert alphas.min() >= 1e-4
    assert alphas.max() <= 0.5
    log_lrs = torch.cat([optimizer.state[p]["log_lr"].flatten() for p in params])
    assert log_lrs.min() >= math.log(1e-4)
    assert log_lrs.max() <= math.log(0.5)
    # Both bounds are reached. alpha there is within rounding of the bound.
    assert (log_lrs == math.log(1e-4)).any()
    assert (log_lrs == math.log(0.5)).any()
    assert torch.isclose(alphas.min(), torch.tensor(1e-4, dtype=torch.float64), rtol=1e-12)


@pytest.mark.parametrize("foreach", KERNELS)
def test_nonfinite_hvp_resets_trace(foreach):
    param, optimizer = _hand_set_optimizer("hvp", foreach)
    optimizer.step(hvp=[_tensor([math.inf, math.nan, 2.0])])

    _assert_shared_core(param, optimizer)
    # The third weight is the finite case of test_hvp_rule_one_step_by_hand.
    _assert_close(optimizer.traces()[0], [0.0, 0.0, -0.525944785706118])


@pytest.mark.parametrize("foreach", KERNELS)
def test_nonfinite_curvature_resets_trace(foreach):
    param, optimizer = _hand_set_optimizer("decay", foreach)
    optimizer.update_curvature([_tensor([math.nan, 3.0, 0.5])], batch_size=2)
    optimizer.step()

    _assert_close(param.detach(), EXPECTED_THETA)
    # The decay of the first weight is nan, the others match test_decay_rule_one_step_by_hand.
    _assert_close(optimizer.traces()[0], [0.0, -0.09048374180359596, -0.27976796370476753])


@pytest.mark.parametrize("foreach", KERNELS)
@pytest.mark.parametrize("trace", RULES)
def test_nonfinite_trace_reset_to_zero(trace, foreach):
    param, optimizer = _hand_set_optimizer(trace, foreach)
    optimizer.state[param]["trace"].copy_(_tensor([math.inf, -math.inf, -0.5]))
    step_kwargs = {"hvp": [_tensor([0.6, -1.0, 2.0])]} if trace == "hvp" else {}
    optimizer.step(**step_kwargs)

    trace_after = optimizer.traces()[0]
    assert trace_after[0] == 0.0
    assert trace_after[1] == 0.0
    assert torch.isfinite(trace_after[2])
    assert torch.isfinite(param).all()
    assert torch.isfinite(optimizer.state[param]["log_lr"]).all()


@pytest.mark.parametrize("foreach", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zero_meta_lr_keeps_alpha0(dtype, foreach):
    params = _make_params((dtype, dtype, dtype))
    optimizer = LearnedStepSize(params, alpha0=0.1, meta_lr=0.0, foreach=foreach)
    initial = [p.detach().clone() for p in params]
    grads = []
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator, dtype=dtype)
        grads.append([p.grad.clone() for p in params])
        optimizer.step()

    for alpha in optimizer.step_sizes():
        assert torch.equal(alpha, torch.full_like(alpha, 0.1))
    for index, p in enumerate(params):
        expected = initial[index].clone()
        for step_grads in grads:
            expected -= 0.1 * step_grads[index]
        torch.testing.assert_close(p.detach(), expected)


@pytest.mark.parametrize("foreach", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_steps_finite(dtype, foreach):
    params = _make_params((dtype, dtype, dtype))
    optimizer = LearnedStepSize(params, trace="decay", curvature_every=2, foreach=foreach)
    _run_steps(params, optimizer, steps=4)

    for p in params:
        assert p.dtype == dtype
        assert torch.isfinite(p).all()
        assert optimizer.state[p]["log_lr"].dtype == dtype
    alphas = torch.cat([a.float().flatten() for a in optimizer.step_sizes()])
    assert not torch.allclose(alphas, torch.full_like(alphas, 0.1), rtol=0.05)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha0": -1}, "invalid alpha0 -1: must be > 0"),
        ({"alpha0": 5.0}, "invalid alpha0 5.0: must be <= alpha_max 3.0"),
        ({"alpha0": 1e-7}, "invalid alpha0 1e-07: must be >= alpha_min 1e-06"),
        ({"alpha0": math.nan}, "invalid alpha0 nan: must be a finite real number"),
        ({"meta_lr": -0.1}, "invalid meta_lr -0.1: must be >= 0"),
        ({"meta_lr": math.inf}, "invalid meta_lr inf: must be a finite real number"),
        ({"alpha_min": 0.0}, "invalid alpha_min 0.0: must be > 0"),
        ({"alpha_max": 1e-7}, "invalid alpha_max 1e-07: must be >= alpha_min 1e-06"),
        ({"gamma": 1.5}, "invalid gamma 1.5: must be in [0, 1]"),
        ({"meta_momentum": 1.0}, "invalid meta_momentum 1.0: must be in [0, 1)"),
        ({"sign_mix": -0.1}, "invalid sign_mix -0.1: must be in [0, 1]"),
        ({"trace": "adam"}, "invalid trace 'adam': must be one of 'gradient', 'decay', 'hvp'"),
        ({"curvature": "fisher"}, "invalid curvature 'fisher': must be one of 'hessian', 'ggn'"),
        ({"curvature_every": 0}, "invalid curvature_every 0: must be an int >= 1"),
        ({"curvature_every": 2.0}, "invalid curvature_every 2.0: must be an int >= 1"),
        ({"curvature_rho": 1.0}, "invalid curvature_rho 1.0: must be in [0, 1)"),
        ({"foreach": "yes"}, "invalid foreach 'yes': must be None, True or False"),
        ({"gamma": "0.9"}, "invalid gamma '0.9': must be a finite real number"),
    ],
)
def test_invalid_hyperparameter_raises(kwargs, message):
    param = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError) as error:
        LearnedStepSize([param], **kwargs)
    assert str(error.value) == message


def test_boundary_hyperparameters_accepted():
    param = torch.nn.Parameter(torch.zeros(2))
    LearnedStepSize(
        [param],
        alpha0=3.0,
        meta_lr=0.0,
        gamma=1.0,
        meta_momentum=0.0,
        sign_mix=1.0,
        curvature_every=1,
        curvature_rho=0.0,
    )


def test_param_group_rejects_other_trace():
    first = torch.nn.Parameter(torch.zeros(2))
    second = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="every group must use the optimizer's trace 'gradient'"):
        LearnedStepSize([{"params": [first]}, {"params": [second], "trace": "hvp"}])


def test_param_group_rejects_invalid_value():
    optimizer = LearnedStepSize([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="invalid gamma 2.0"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "gamma": 2.0})
    assert len(optimizer.param_groups) == 1


def test_integer_parameter_rejected():
    with pytest.raises(ValueError, match="invalid parameter dtype torch.int64"):
        LearnedStepSize([torch.zeros(2, dtype=torch.int64)])


def test_step_checks_hvp_argument():
    param = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    param.grad = torch.ones(3, dtype=torch.float64)

    hvp_optimizer = LearnedStepSize([param], trace="hvp")
    with pytest.raises(ValueError, match="trace='hvp' requires hvp"):
        hvp_optimizer.step()
    with pytest.raises(ValueError, match="invalid hvp: got 2 tensors for 1 parameters"):
        hvp_optimizer.step(hvp=[torch.zeros(3), torch.zeros(3)])
    with pytest.raises(ValueError, match=r"invalid hvp\[0\]: shape \(2,\)"):
        hvp_optimizer.step(hvp=[torch.zeros(2)])

    gradient_optimizer = LearnedStepSize([param], trace="gradient")
    with pytest.raises(ValueError, match="trace='gradient' does not use it"):
        gradient_optimizer.step(hvp=[torch.zeros(3)])


def test_update_curvature_requires_decay_rule():
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = LearnedStepSize([param], trace="gradient")
    with pytest.raises(RuntimeError, match="requires trace='decay'"):
        optimizer.update_curvature([torch.zeros(3)], batch_size=1)

    decay_optimizer = LearnedStepSize([param], trace="decay")
    with pytest.raises(ValueError, match="invalid batch_size 0"):
        decay_optimizer.update_curvature([torch.zeros(3)], batch_size=0)


def test_curvature_due_every_k_steps():
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = LearnedStepSize([param], trace="decay", curvature_every=3)
    due = []
    for _ in range(7):
        due.append(optimizer.curvature_due())
        param.grad = torch.ones(2)
        optimizer.step()
    assert due == [True, False, False, True, False, False, True]

    assert not LearnedStepSize([param], trace="gradient").curvature_due()
    every_step = LearnedStepSize([param], trace="decay", curvature_every=1)
    assert every_step.curvature_due()


def test_needs_hvp_only_for_hvp_rule():
    param = torch.nn.Parameter(torch.zeros(2))
    assert LearnedStepSize([param], trace="hvp").needs_hvp
    assert not LearnedStepSize([param], trace="decay").needs_hvp
    assert not LearnedStepSize([param], trace="gradient").needs_hvp


def test_budget_counts_state():
    params = _make_params()  # 12 + 3 + 8 = 23 weights
    assert LearnedStepSize(params, trace="gradient").budget() == {
        "step_sizes": 23,
        "decays": 0,
        "auxiliary": 46,
    }
    assert LearnedStepSize(params, trace="decay").budget() == {
        "step_sizes": 23,
        "decays": 23,
        "auxiliary": 46,
    }
    assert LearnedStepSize(params, trace="hvp").budget()["decays"] == 0


def test_diagnostics_quantiles_and_bounds():
    first = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    second = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    optimizer = LearnedStepSize([first, second], alpha_min=0.01, alpha_max=2.0, trace="decay")
    optimizer.traces()
    alphas = [0.01, 0.01, 0.1, 1.0, 2.0]
    optimizer.state[first]["log_lr"].copy_(_tensor([math.log(a) for a in alphas]))
    optimizer.state[first]["curvature"].copy_(_tensor([0.0, 50.0, 5.0, 0.5, 1.0]))

    rows = optimizer.diagnostics(quantiles=(0.0, 0.5, 0.75, 1.0))

    assert [(row["param_index"], row["quantity"]) for row in rows] == [
        (0, "step_size"),
        (0, "curvature"),
        (0, "decay"),
        (1, "step_size"),
        (1, "curvature"),
        (1, "decay"),
    ]
    step_size = rows[0]
    assert step_size["quantiles"][0.0] == pytest.approx(0.01)
    assert step_size["quantiles"][0.5] == pytest.approx(0.1)
    assert step_size["quantiles"][0.75] == pytest.approx(1.0)
    assert step_size["quantiles"][1.0] == pytest.approx(2.0)
    assert step_size["frac_at_min"] == pytest.approx(0.4)
    assert step_size["frac_at_max"] == pytest.approx(0.2)

    curvature = rows[1]
    assert curvature["quantiles"][0.5] == pytest.approx(1.0)
    assert curvature["frac_at_min"] is None
    assert curvature["frac_at_max"] is None

    # d = clamp(1 - alpha * curvature, 0, 1) = [1, 0.5, 0.5, 0.5, 0]
    decay = rows[2]
    assert decay["quantiles"][0.0] == pytest.approx(0.0)
    assert decay["quantiles"][0.5] == pytest.approx(0.5)
    assert decay["quantiles"][1.0] == pytest.approx(1.0)
    assert decay["frac_at_min"] == pytest.approx(0.2)
    assert decay["frac_at_max"] == pytest.approx(0.2)

    # The second parameter has its initial step size 0.1 everywhere.
    assert rows[3]["quantiles"][0.5] == pytest.approx(0.1)
    assert rows[3]["frac_at_min"] == 0.0


def test_diagnostics_without_curvature_rows():
    params = _make_params()
    rows = LearnedStepSize(params, trace="hvp").diagnostics()
    assert [row["quantity"] for row in rows] == ["step_size"] * 3
    assert set(rows[0]["quantiles"]) == {0.05, 0.25, 0.5, 0.75, 0.95}


@pytest.mark.parametrize("trace", RULES)
def test_state_dict_round_trip(trace):
    kwargs = {"trace": trace, "curvature_every": 2, "meta_lr": 0.05}
    params = _make_params()
    optimizer = LearnedStepSize(params, **kwargs)
    _run_steps(params, optimizer, steps=3, seed=1)

    saved_state = copy.deepcopy(optimizer.state_dict())
    saved_params = [p.detach().clone() for p in params]
    _run_steps(params, optimizer, steps=4, seed=2)

    restored_params = [torch.nn.Parameter(p.clone()) for p in saved_params]
    restored = LearnedStepSize(restored_params, **kwargs)
    restored.load_state_dict(saved_state)
    _run_steps(restored_params, restored, steps=4, seed=2)

    _assert_same_state(params, optimizer, restored_params, restored, rtol=0, atol=0)


def test_load_state_dict_rejects_other_trace():
    params = _make_params()
    decay = LearnedStepSize(params, trace="decay")
    _run_steps(params, decay, steps=1)
    gradient = LearnedStepSize(params, trace="gradient")
    with pytest.raises(ValueError, match="saved with trace='decay'"):
        gradient.load_state_dict(decay.state_dict())
