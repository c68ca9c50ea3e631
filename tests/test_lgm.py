"""LGM (linear gradient matching): loss and gradient of lgm_step against a direct implementation of the formula.

The oracle writes the cross-entropy gradients of the random linear head in closed form,
    dCE/dW = phi^T (softmax(phi W + b) - Y) / n,   dCE/db = mean(softmax(phi W + b) - Y),
so its gradient w.r.t. the synthetic parameters needs one ordinary backward, whereas lgm_step gets the head's
gradients from autograd and differentiates them again (double backward through the encoder).
"""
import pytest
import torch
import torch.nn.functional as F

from clpdd_fast.augment import build_augment
from clpdd_fast.encoders import build_encoder
from clpdd_fast.methods import LGM_HEAD_STD, METHODS, LgmInputs, StepInputs, lgm_draws, lgm_step
from clpdd_fast.synthetic import build_synthetic

from helpers import TINY_MODEL
C = 3


def make_inputs(encoder, augment="standard", K=2):
    pool = torch.rand(30, 3, 20, 20, generator=torch.Generator().manual_seed(3))
    pool_labels = torch.arange(30) % C

    def real_images(n, generator):
        rows = torch.randint(len(pool), (n,), generator=generator)
        return pool[rows], pool_labels[rows]

    return StepInputs(encoder=encoder, augment=build_augment(augment), image_size=16, num_classes=C,
                      lgm=LgmInputs(real_images=real_images, augs_per_batch=K))


def make_synthetic(param="pixel"):
    init = torch.rand(2 * C, 3, 20, 20, generator=torch.Generator().manual_seed(1)).clamp(0.05, 0.95)
    return build_synthetic(param, torch.arange(2 * C) % C, 20, init)


def closed_form_grads(phi, labels, weight, bias):
    probs = torch.softmax(phi @ weight + bias, dim=1)
    delta = (probs - F.one_hot(labels, C).to(phi.dtype)) / phi.shape[0]
    return phi.T @ delta, delta.sum(0)


def oracle(synthetic, inputs, generator):
    """The LGM loss straight from the formula, replaying lgm_step's random draws; returns the loss (with graph)."""
    real_images, real_labels, real_params, syn_params = lgm_draws(synthetic, inputs, generator)
    aug, K = inputs.augment, inputs.lgm.augs_per_batch
    with torch.no_grad():
        phi_r = inputs.encoder(aug.apply(real_images, real_params, inputs.image_size))
    weight = (torch.randn(phi_r.shape[1], C, generator=generator) * LGM_HEAD_STD).to(phi_r.dtype)
    bias = torch.zeros(C, dtype=phi_r.dtype)
    copies = torch.cat([synthetic.decode() for _ in range(K)])
    phi_s = inputs.encoder(aug.apply(copies, syn_params, inputs.image_size))
    gw_r, gb_r = closed_form_grads(phi_r, real_labels, weight, bias)
    gw_s, gb_s = closed_form_grads(phi_s, synthetic.labels.repeat(K), weight, bias)
    a, b = torch.cat([gw_r.flatten(), gb_r]), torch.cat([gw_s.flatten(), gb_s])
    return 1 - (a @ b) / (a.norm() * b.norm())


class Float64Encoder(torch.nn.Module):
    """The tiny encoder in float64, so the comparison is not drowned by float32 round-off (the loss is 1 - cos with
    cos near 0, where float32 cancellation leaves ~1e-4 relative noise in the gradient)."""

    def __init__(self, frozen):
        super().__init__()
        self.model = frozen.model.double()
        self.feature_dim = frozen.feature_dim
        self.register_buffer("mean", frozen._mean.double())
        self.register_buffer("std", frozen._std.double())

    def forward(self, images):
        return self.model((images.double() - self.mean) / self.std)


@pytest.fixture(scope="module")
def encoder64():
    return Float64Encoder(build_encoder(TINY_MODEL, "none", "cpu"))


def step_and_oracle(synthetic, inputs, seed=11):
    loss = lgm_step(synthetic, inputs, torch.Generator().manual_seed(seed))
    grads = [p.grad.clone() for p in synthetic.parameters() if p.grad is not None]
    synthetic.zero_grad(set_to_none=True)
    expected = oracle(synthetic, inputs, torch.Generator().manual_seed(seed))
    expected.backward()
    want = [p.grad for p in synthetic.parameters() if p.grad is not None]
    assert len(grads) == len(want) > 0 and all(bool(g.abs().sum() > 0) for g in grads)
    return loss, expected.detach(), [float((g - w).norm() / w.norm()) for g, w in zip(grads, want)]


@pytest.mark.parametrize("param,augment", [("pixel", "standard"), ("pyramid", "none")])
def test_lgm_loss_and_gradient_match_the_formula_float64(encoder64, param, augment):
    inputs = make_inputs(encoder64, augment)
    pool_images = inputs.lgm.real_images
    inputs.lgm.real_images = lambda n, g: (pool_images(n, g)[0].double(), pool_images(n, g)[1])
    synthetic = make_synthetic(param).double()
    loss, expected, errors = step_and_oracle(synthetic, inputs)
    assert loss.dtype == torch.float64 and 0 < float(loss) < 2
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    assert max(errors) < 1e-8, errors


def test_lgm_matches_the_formula_in_float32(encoder):
    loss, expected, errors = step_and_oracle(make_synthetic(), make_inputs(encoder, "standard"))
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    assert max(errors) < 2e-3, errors  # float32 round-off only (see Float64Encoder)


def test_lgm_is_registered_and_draws_a_fresh_head_each_step(encoder):
    assert METHODS["lgm"] is lgm_step
    inputs = make_inputs(encoder, "none", K=1)
    synthetic = make_synthetic()
    g = torch.Generator().manual_seed(0)
    first = lgm_step(synthetic, inputs, g)
    second = lgm_step(synthetic, inputs, g)  # same images, new real batch and new head
    assert float(first) != float(second)
    again = lgm_step(synthetic, inputs, torch.Generator().manual_seed(0))
    assert float(again) == float(first)


def test_lgm_reduces_its_loss_when_optimised(encoder):
    inputs = make_inputs(encoder, "none", K=1)
    synthetic = make_synthetic()
    opt = torch.optim.Adam(synthetic.parameters(), lr=0.1)
    losses = []
    for _ in range(8):
        opt.zero_grad(set_to_none=True)
        # Same generator seed each time: one fixed objective, so the decrease is not noise.
        losses.append(float(lgm_step(synthetic, inputs, torch.Generator().manual_seed(4))))
        opt.step()
    assert losses[-1] < losses[0]


def test_lgm_needs_real_images(encoder):
    inputs = make_inputs(encoder)
    inputs.lgm = None
    with pytest.raises(ValueError, match="real_images"):
        lgm_step(make_synthetic(), inputs, torch.Generator())
    inputs = make_inputs(encoder, K=0)
    with pytest.raises(ValueError, match="augs_per_batch"):
        lgm_step(make_synthetic(), inputs, torch.Generator())
