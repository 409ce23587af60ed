"""Tests of the curvature products against dense autograd oracles, and of backward_and_step."""

import gc
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, hessian, jacrev

from stepcli.optim import (
    LearnedStepSize,
    backward_and_step,
    ggn_vp,
    hvp,
    sampled_label_grads,
)

DTYPE = torch.float64


def _mlp(activation, sizes=(3, 4, 3), seed=0):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(activation())
    return torch.nn.Sequential(*layers).to(DTYPE)


def _batch(batch_size, features=3, classes=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch_size, features, generator=generator, dtype=DTYPE)
    labels = torch.randint(0, classes, (batch_size,), generator=generator)
    return inputs, labels


def _random_like(params, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]


class _Flat:
    """A model's parameters as one flat vector, for dense torch.func oracles."""

    def __init__(self, model):
        self.model = model
        self.names = [name for name, _ in model.named_parameters()]
        self.shapes = [p.shape for p in model.parameters()]
        self.vector = torch.cat([p.detach().flatten() for p in model.parameters()])

    def logits(self, vector, inputs):
        tensors = {}
        offset = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = shape.numel()
            tensors[name] = vector[offset : offset + size].view(shape)
            offset += size
        return functional_call(self.model, tensors, (inputs,))

    @staticmethod
    def join(tensors):
        return torch.cat([t.flatten() for t in tensors])


def _flat_loss(flat, inputs, labels, vector):
    return F.cross_entropy(flat.logits(vector, inputs), labels)


def test_hvp_matches_dense_hessian():
    model = _mlp(torch.nn.Tanh)
    inputs, labels = _batch(5)
    params = list(model.parameters())
    vectors = _random_like(params)
    flat = _Flat(model)

    dense = hessian(partial(_flat_loss, flat, inputs, labels))(flat.vector)
    expected = dense @ flat.join(vectors)

    loss = F.cross_entropy(model(inputs), labels)
    from_loss = flat.join(hvp(loss, params, vectors))
    torch.testing.assert_close(from_loss, expected, rtol=1e-10, atol=1e-12)

    loss = F.cross_entropy(model(inputs), labels)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    from_grads = flat.join(hvp(grads, params, vectors))
    torch.testing.assert_close(from_grads, expected, rtol=1e-10, atol=1e-12)


def _dense_ggn(flat, inputs):
    """Build J^T H_out J for the mean cross-entropy with a dense Jacobian."""
    batch_size = inputs.shape[0]
    logits = flat.logits(flat.vector, inputs)
    jacobian = jacrev(lambda v: flat.logits(v, inputs))(flat.vector)  # (B, K, P)
    probs = torch.softmax(logits.detach(), dim=-1)
    output_hessian = (torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]) / batch_size
    return torch.einsum("bkp,bkl,blq->pq", jacobian, output_hessian, jacobian)


def test_ggn_vp_matches_dense_ggn():
    model = _mlp(torch.nn.ReLU, sizes=(3, 5, 4, 3))
    inputs, _ = _batch(6)
    params = list(model.parameters())
    vectors = _random_like(params)
    flat = _Flat(model)

    expected = _dense_ggn(flat, inputs) @ flat.join(vectors)
    products = ggn_vp(model(inputs), params, vectors)

    torch.testing.assert_close(flat.join(products), expected, rtol=1e-10, atol=1e-12)


def test_ggn_equals_hessian_for_linear_model():
    # With logits linear in the parameters, the Hessian of the loss is exactly J^T H_out J.
    model = torch.nn.Linear(3, 4).to(DTYPE)
    inputs, labels = _batch(5, classes=4)
    params = list(model.parameters())
    vectors = _random_like(params)

    logits = model(inputs)
    products_ggn = ggn_vp(logits, params, vectors, retain_graph=True)
    products_hessian = hvp(F.cross_entropy(logits, labels), params, vectors)

    for a, b in zip(products_ggn, products_hessian, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_products_zero_for_unused_parameter():
    model = _mlp(torch.nn.Tanh)
    unused = torch.nn.Parameter(torch.ones(2, dtype=DTYPE))
    inputs, labels = _batch(4)
    params = [*model.parameters(), unused]
    vectors = _random_like(params)

    logits = model(inputs)
    from_hessian = hvp(F.cross_entropy(logits, labels), params, vectors, retain_graph=True)
    from_ggn = ggn_vp(logits, params, vectors)

    assert torch.equal(from_hessian[-1], torch.zeros(2, dtype=DTYPE))
    assert torch.equal(from_ggn[-1], torch.zeros(2, dtype=DTYPE))
    assert from_hessian[0].abs().sum() > 0


def test_sampled_label_estimate_matches_hessian_diagonal():
    # Oracle: for labels sampled from the model, E[g_s g_s^T] = (1/B^2) sum_b J_b^T
    # (diag(p_b) - p_b p_b^T) J_b, because the per-example scores have zero mean and are
    # drawn independently, so the cross terms vanish. B E[g_s^2] is then the diagonal of
    # the Gauss-Newton matrix of the mean loss. Each logit of a ReLU network is piecewise
    # linear in each single weight, so the Hessian and the Gauss-Newton matrix have the
    # same diagonal (away from the kinks). B = 3 checks the factor B.
    model = _mlp(torch.nn.ReLU, sizes=(3, 6, 3), seed=4)
    inputs, labels = _batch(3, seed=5)
    params = list(model.parameters())
    flat = _Flat(model)
    dense = hessian(partial(_flat_loss, flat, inputs, labels))(flat.vector)
    expected = torch.diagonal(dense)

    samples = 2000
    generator = torch.Generator().manual_seed(6)
    estimates = []
    logits = model(inputs)
    for _ in range(samples):
        grads = sampled_label_grads(logits, params, generator, retain_graph=True)
        estimates.append(3 * flat.join(grads) ** 2)
    estimates = torch.stack(estimates)
    mean = estimates.mean(dim=0)
    standard_error = estimates.std(dim=0) / samples**0.5

    # Every weight within 5 standard errors of the Monte Carlo mean (plus 1e-9 for
    # weights whose estimate is exactly 0), and the whole diagonal within 5 % in norm.
    assert (expected.abs() > 1e-6).sum() > 10
    assert torch.all((mean - expected).abs() <= 5 * standard_error + 1e-9)
    assert torch.linalg.norm(mean - expected) <= 0.05 * torch.linalg.norm(expected)


def test_sampled_label_grads_reproducible():
    model = _mlp(torch.nn.ReLU)
    inputs, _ = _batch(8)
    params = list(model.parameters())
    logits = model(inputs)

    first = sampled_label_grads(logits, params, torch.Generator().manual_seed(7), retain_graph=True)
    second = sampled_label_grads(logits, params, torch.Generator().manual_seed(7))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_products_reject_bad_shapes():
    model = _mlp(torch.nn.Tanh)
    params = list(model.parameters())
    inputs, labels = _batch(4)
    logits = model(inputs)
    with pytest.raises(ValueError, match="invalid logits of shape \\(12,\\)"):
        ggn_vp(logits.flatten(), params, _random_like(params))
    with pytest.raises(ValueError, match="invalid vectors: got 1 tensors"):
        hvp(F.cross_entropy(logits, labels), params, _random_like(params)[:1])
    with pytest.raises(ValueError, match="must be a scalar"):
        hvp(F.cross_entropy(logits, labels, reduction="none"), params, _random_like(params))


def test_backward_and_step_adam_matches_manual():
    inputs, labels = _batch(6)
    model_a = _mlp(torch.nn.Tanh)
    model_b = _mlp(torch.nn.Tanh)
    adam_a = torch.optim.Adam(model_a.parameters(), lr=0.01)
    adam_b = torch.optim.Adam(model_b.parameters(), lr=0.01)

    for _ in range(3):
        logits = model_a(inputs)
        backward_and_step(
            adam_a, list(model_a.parameters()), F.cross_entropy(logits, labels), logits
        )

        adam_b.zero_grad()
        F.cross_entropy(model_b(inputs), labels).backward()
        adam_b.step()

    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_backward_and_step_hvp_matches_dense(curvature):
    inputs, labels = _batch(6)
    model_a = _mlp(torch.nn.Tanh)
    model_b = _mlp(torch.nn.Tanh)
    kwargs = {"trace": "hvp", "curvature": curvature, "meta_lr": 0.05}
    optimizer_a = LearnedStepSize(model_a.parameters(), **kwargs)
    optimizer_b = LearnedStepSize(model_b.parameters(), **kwargs)

    for _ in range(4):
        logits = model_a(inputs)
        loss = F.cross_entropy(logits, labels)
        backward_and_step(optimizer_a, list(model_a.parameters()), loss, logits)

        # Reference: gradients by plain backward, C h by a dense matrix-vector product.
        params_b = list(model_b.parameters())
        flat = _Flat(model_b)
        if curvature == "hessian":
            dense = hessian(partial(_flat_loss, flat, inputs, labels))(flat.vector)
        else:
            dense = _dense_ggn(flat, inputs)
        product = dense @ flat.join(optimizer_b.traces())
        products = [
            t.view_as(p)
            for t, p in zip(product.split([p.numel() for p in params_b]), params_b, strict=True)
        ]
        optimizer_b.zero_grad()
        F.cross_entropy(model_b(inputs), labels).backward()
        optimizer_b.step(hvp=products)

    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(optimizer_a.traces(), optimizer_b.traces(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert a.abs().sum() > 0


def test_backward_and_step_decay_uses_same_logits():
    inputs, labels = _batch(6)
    model_a = _mlp(torch.nn.ReLU)
    model_b = _mlp(torch.nn.ReLU)
    optimizer_a = LearnedStepSize(model_a.parameters(), trace="decay", curvature_every=2)
    optimizer_b = LearnedStepSize(model_b.parameters(), trace="decay", curvature_every=2)
    generator_a = torch.Generator().manual_seed(11)
    generator_b = torch.Generator().manual_seed(11)

    for step in range(4):
        logits = model_a(inputs)
        loss = F.cross_entropy(logits, labels)
        backward_and_step(optimizer_a, list(model_a.parameters()), loss, logits, generator_a)

        params_b = list(model_b.parameters())
        optimizer_b.zero_grad()
        logits_b = model_b(inputs)
        F.cross_entropy(logits_b, labels).backward(retain_graph=True)
        if step % 2 == 0:
            sampled = sampled_label_grads(logits_b, params_b, generator_b)
            optimizer_b.update_curvature(sampled, batch_size=6)
        optimizer_b.step()

    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        curvature_a = optimizer_a.state[a]["curvature"]
        torch.testing.assert_close(curvature_a, optimizer_b.state[b]["curvature"])
        assert optimizer_a.state[a]["curvature_updates"] == 2
    assert any(optimizer_a.state[p]["curvature"].abs().sum() > 0 for p in model_a.parameters())


def test_backward_and_step_rejects_other_params():
    model = _mlp(torch.nn.Tanh)
    inputs, labels = _batch(4)
    optimizer = LearnedStepSize(model.parameters(), trace="hvp")
    logits = model(inputs)
    params = list(model.parameters())[::-1]
    with pytest.raises(ValueError, match="must be the optimizer's parameters in its order"):
        backward_and_step(optimizer, params, F.cross_entropy(logits, labels), logits)


def _rss_bytes():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_memory_flat_over_hvp_steps(curvature):
    # 2000 steps on a small MLP. Keeping each step's logits, and so their graph, alive
    # made RSS grow by about 53 MiB over the 1800 measured steps (CPU, torch 2.14.1).
    model = _mlp(torch.nn.Tanh, sizes=(10, 128, 128, 4))
    optimizer = LearnedStepSize(model.parameters(), trace="hvp", curvature=curvature)
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(32, 10, generator=generator, dtype=DTYPE)
    labels = torch.randint(0, 4, (32,), generator=generator)

    def train(steps):
        for _ in range(steps):
            logits = model(inputs)
            backward_and_step(optimizer, params, F.cross_entropy(logits, labels), logits)

    train(200)
    gc.collect()
    warm = _rss_bytes()
    train(1800)
    gc.collect()
    growth = _rss_bytes() - warm

    assert growth < 20 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 1800 steps"
    assert all(torch.isfinite(p).all() for p in params)
