"""Replayable differentiable augmentation: determinism, chunk replay, gradients, flip, crop bounds, presets."""
import math

import pytest
import torch

from clpdd_fast.augment import AugmentParams, Augment, build_augment


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _images(B=6, S=16, dtype=torch.float32, seed=1):
    return torch.rand((B, 3, S, S), generator=_gen(seed), dtype=dtype)


def test_same_params_same_output():
    aug = build_augment("standard")
    x = _images()
    p = aug.sample(6, _gen(), "cpu")
    a, b = aug.apply(x, p, 12), aug.apply(x, p, 12)
    assert torch.equal(a, b)
    # and a fresh draw differs (the test above would pass trivially if apply ignored params)
    q = aug.sample(6, _gen(5), "cpu")
    assert not torch.allclose(aug.apply(x, q, 12), a)


def test_sampling_is_reproducible_from_the_generator():
    aug = build_augment("standard")
    p, q = aug.sample(8, _gen(3), "cpu"), aug.sample(8, _gen(3), "cpu")
    for name in ("flip", "boxes", "noise", "seeds"):
        assert torch.equal(getattr(p, name), getattr(q, name))


@pytest.mark.parametrize("name", ["standard", "flip_crop", "none"])
def test_select_chunk_replays_full_batch_rows(name):
    aug = build_augment(name)
    x = _images(B=10)
    p = aug.sample(10, _gen(7), "cpu")
    full = aug.apply(x, p, 12)
    for idx in (torch.tensor([3, 0, 9]), torch.arange(4, 8)):
        assert torch.equal(aug.apply(x[idx], p.select(idx), 12), full[idx])
    assert torch.equal(aug.apply(x[2:5], p[2:5], 12), full[2:5])
    assert len(p.select(torch.tensor([1, 2]))) == 2


def test_noise_is_used_and_replayed():
    aug = Augment(flip_p=0.0, crop=False, noise_p=1.0, noise_std=0.2)
    x = _images(B=64, S=8)
    p = aug.sample(64, _gen(), "cpu")
    noise = aug.apply(x, p, 8) - x
    assert 0.18 < float(noise.std()) < 0.22 and abs(float(noise.mean())) < 0.02
    # per-image noise differs between images
    assert not torch.allclose(noise[0], noise[1])
    # the same seed gives the same noise whatever the dtype of the images
    n64 = aug.apply(x.double(), p, 8) - x.double()
    assert torch.allclose(n64.float(), noise, atol=1e-6)


def test_noise_probability_about_half():
    aug = build_augment("standard")
    p = aug.sample(4000, _gen(), "cpu")
    assert 0.45 < float(p.noise.float().mean()) < 0.55
    assert 0.45 < float(p.flip.float().mean()) < 0.55


def test_gradcheck_apply_wrt_images():
    aug = build_augment("standard")
    x = _images(B=2, S=5, dtype=torch.float64).requires_grad_()
    p = aug.sample(2, _gen(11), "cpu")
    assert torch.autograd.gradcheck(lambda t: aug.apply(t, p, 4), (x,))
    none = build_augment("none")
    assert torch.autograd.gradcheck(lambda t: none.apply(t, none.sample(2, _gen(), "cpu"), 3), (x,))


def test_full_crop_identity_and_flip():
    aug = Augment(flip_p=0.5, crop=False, noise_p=0.0)
    x = _images(B=64, S=8)
    p = aug.sample(64, _gen(2), "cpu")
    assert bool(p.flip.any()) and bool((~p.flip).any())
    out = aug.apply(x, p, 8)
    expected = torch.where(p.flip.view(-1, 1, 1, 1), torch.flip(x, dims=[3]), x)
    assert torch.allclose(out, expected, atol=1e-6)


def test_crop_samples_the_box():
    # the top-left quadrant of an 8x8 image sampled at 4x4: output pixel centres fall exactly on input pixel centres
    x = _images(B=2, S=8)
    aug = Augment(flip_p=0.0, crop=True, noise_p=0.0)
    p = AugmentParams(flip=torch.tensor([False, True]), boxes=torch.tensor([[0.0, 0.0, 0.5, 0.5]] * 2),
                      noise=torch.tensor([False, False]), seeds=torch.tensor([0, 0]))
    out = aug.apply(x, p, 4)
    assert torch.allclose(out[0], x[0, :, :4, :4], atol=1e-6)
    assert torch.allclose(out[1], torch.flip(x[1, :, :4, :4], dims=[2]), atol=1e-6)
    # the bottom-right quadrant
    q = AugmentParams(flip=torch.tensor([False, False]), boxes=torch.tensor([[0.5, 0.5, 0.5, 0.5]] * 2),
                      noise=torch.tensor([False, False]), seeds=torch.tensor([0, 0]))
    assert torch.allclose(aug.apply(x, q, 4), x[:, :, 4:, 4:], atol=1e-6)


def test_crop_scale_and_ratio_within_bounds():
    aug = build_augment("standard")
    p = aug.sample(20000, _gen(4), "cpu")
    x0, y0, w, h = p.boxes.double().unbind(1)
    area, ratio = w * h, w / h
    tol = 1e-5
    assert float(area.min()) >= 0.08 - tol and float(area.max()) <= 1.0 + tol
    assert float(ratio.min()) >= 3 / 4 - tol and float(ratio.max()) <= 4 / 3 + tol
    assert float(x0.min()) >= 0 and float(y0.min()) >= 0
    assert float((x0 + w).max()) <= 1 + tol and float((y0 + h).max()) <= 1 + tol
    # the distribution spans the range (not stuck on the fallback full-image crop)
    assert float(area.min()) < 0.1 and float(area.median()) < 0.8
    assert float(ratio.min()) < 0.8 and float(ratio.max()) > 1.25


@pytest.mark.parametrize("scale", [(0.2, 0.5), (0.05, 0.3)])
def test_crop_area_respects_both_scale_bounds(scale):
    # upper bounds below 1 (every crop of these is valid, so no fallback box can stand in for a sampled one)
    aug = Augment(scale=scale, noise_p=0.0)
    area = aug.sample(5000, _gen(7), "cpu").boxes.double()[:, 2:].prod(1)
    tol = 1e-5
    assert float(area.min()) >= scale[0] - tol and float(area.max()) <= scale[1] + tol
    span = scale[1] - scale[0]
    assert float(area.min()) < scale[0] + 0.02 * span and float(area.max()) > scale[1] - 0.02 * span


def test_crop_fallback_is_valid():
    # scales near 1 with extreme ratios are rarely valid: the fallback must still give a box inside the image
    aug = Augment(scale=(0.95, 1.0), ratio=(3.0, 4.0), noise_p=0.0)
    p = aug.sample(500, _gen(), "cpu")
    x0, y0, w, h = p.boxes.double().unbind(1)
    assert float((x0 + w).max()) <= 1 + 1e-6 and float((y0 + h).max()) <= 1 + 1e-6
    assert float(x0.min()) >= 0 and float(y0.min()) >= 0
    assert float((w / h).min()) >= 3.0 - 1e-4  # the fallback clamps the ratio into bounds


def test_none_is_identity_or_resize():
    aug = build_augment("none")
    x = _images()
    p = aug.sample(6, _gen(), "cpu")
    assert torch.equal(aug.apply(x, p, 16), x)
    resized = torch.nn.functional.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(aug.apply(x, p, 8), resized)
    assert aug.is_identity and not build_augment("standard").is_identity


def test_flip_crop_has_no_noise():
    aug = build_augment("flip_crop")
    p = aug.sample(100, _gen(), "cpu")
    x = torch.full((100, 3, 8, 8), 0.3)
    assert torch.allclose(aug.apply(x, p, 6), torch.full((100, 3, 6, 6), 0.3), atol=1e-6)


def test_overrides_and_unknown_name():
    assert build_augment("standard", noise_p=0.0).noise_p == 0.0
    with pytest.raises(ValueError, match="augment"):
        build_augment("mixup")
    with pytest.raises(ValueError, match="flip_p"):
        Augment(flip_p=1.5)


def test_apply_validates_batch():
    aug = build_augment("standard")
    p = aug.sample(3, _gen(), "cpu")
    with pytest.raises(ValueError, match="params"):
        aug.apply(_images(B=4), p, 8)
    with pytest.raises(ValueError, match="image_size"):
        aug.apply(_images(B=3), p, 0)


def test_theta_maps_box_corners():
    aug = build_augment("flip_crop")
    p = AugmentParams(flip=torch.tensor([False, True]), boxes=torch.tensor([[0.25, 0.5, 0.5, 0.25]] * 2),
                      noise=torch.tensor([False, False]), seeds=torch.tensor([0, 0]))
    theta = aug.theta(p)
    corners = torch.tensor([[-1.0, -1.0, 1.0], [1.0, 1.0, 1.0]]).T  # output (x, y, 1) columns
    mapped = theta[0] @ corners
    # box x in [0.25, 0.75] -> [-0.5, 0.5]; y in [0.5, 0.75] -> [0, 0.5]; columns are the mapped corners
    assert torch.allclose(mapped, torch.tensor([[-0.5, 0.5], [0.0, 0.5]]))
    mapped_flip = theta[1] @ corners
    assert torch.allclose(mapped_flip, torch.tensor([[0.5, -0.5], [0.0, 0.5]]))
    assert math.isclose(float(theta[1, 0, 0]), -0.5)
