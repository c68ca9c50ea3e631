"""Synthetic-image parameterisations: range, inversion, pyramid schedule, gradients, indexing, state round trip."""
import io

import pytest
import torch

from clpdd_fast.synthetic import (PixelImages, PyramidImages, build_synthetic, color_decorrelation_matrix,
                                  pyramid_sizes)

PARAMS = ["pixel", "pyramid"]


def _labels(m=5):
    return torch.arange(m) % 3


def _images(m=5, S=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.01 + 0.98 * torch.rand((m, 3, S, S), generator=g)


def test_color_matrix_is_normalised_method_matrix():
    m = color_decorrelation_matrix(torch.float64)
    raw = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0, -0.05], [0.27, -0.09, 0.03]], dtype=torch.float64)
    assert torch.allclose(m * raw.norm(dim=0).max(), raw)
    assert torch.isclose(m.norm(dim=0).max(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("decorrelate", [True, False])
def test_decode_in_unit_range_even_for_large_parameters(param, decorrelate):
    s = build_synthetic(param, _labels(), 12, None, decorrelate=decorrelate, grow_every=0,
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in s.parameters():
            p.mul_(1000.0)  # saturate the sigmoid: values must still be within [0, 1]
    x = s.decode().detach()
    assert x.shape == (5, 3, 12, 12) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float(x.min()) < 0.01 and float(x.max()) > 0.99


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("decorrelate", [True, False])
@pytest.mark.parametrize("S", [12, 16])
def test_init_from_images_round_trips(param, decorrelate, S):
    x = _images(S=S)
    s = build_synthetic(param, _labels(), S, x, decorrelate=decorrelate, grow_every=0)
    assert torch.allclose(s.decode(), x, atol=1e-5)


def test_init_clamps_extremes_to_finite_logits():
    x = torch.zeros(2, 3, 4, 4)
    x[1] = 1.0
    s = PixelImages(torch.tensor([0, 1]), 4, x)
    assert bool(torch.isfinite(s.logits).all())
    assert torch.allclose(s.decode(), x, atol=2e-4)


def test_noise_init_is_reproducible_and_near_grey():
    a = build_synthetic("pixel", _labels(), 8, None, generator=torch.Generator().manual_seed(3))
    b = build_synthetic("pixel", _labels(), 8, None, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.logits, b.logits)
    assert abs(float(a.decode().detach().mean()) - 0.5) < 0.05


def test_pyramid_sizes():
    assert pyramid_sizes(1) == [1]
    assert pyramid_sizes(8) == [1, 2, 4, 8]
    assert pyramid_sizes(224) == [1, 2, 4, 8, 16, 32, 64, 128, 224]
    assert pyramid_sizes(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]


def test_pyramid_schedule():
    s = PyramidImages(_labels(), 16, grow_every=200)  # levels 1, 2, 4, 8, 16
    assert s.num_levels == 5 and s.num_active == 1
    for step, active in [(0, 1), (199, 1), (200, 2), (399, 2), (400, 3), (800, 5), (10_000, 5)]:
        assert s.upkeep(step) is False  # parameter set never changes
        assert s.num_active == active, step
    assert PyramidImages(_labels(), 16, grow_every=0).num_active == 5


def test_pyramid_inactive_levels_do_not_affect_output_until_active():
    s = PyramidImages(_labels(), 16, grow_every=10, generator=torch.Generator().manual_seed(0))
    s.upkeep(25)  # levels 0, 1, 2 active (1x1, 2x2, 4x4); 8x8 and 16x16 not yet
    assert s.num_active == 3
    before = s.decode().detach().clone()
    with torch.no_grad():
        s.levels[3].add_(1.0)
        s.levels[4].normal_()
    assert torch.equal(s.decode(), before)
    s.upkeep(30)  # 8x8 joins
    after = s.decode()
    assert not torch.allclose(after, before, atol=1e-3)
    # the active finest level changes the output too
    with torch.no_grad():
        s.levels[2].add_(0.5)
    assert not torch.allclose(s.decode(), after, atol=1e-3)


def test_pyramid_inactive_levels_get_no_gradient_and_adam_leaves_them():
    s = PyramidImages(_labels(), 8, grow_every=5, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(s.parameters(), lr=0.1)
    frozen = [p.detach().clone() for p in s.levels]
    s.decode().square().sum().backward()
    assert s.levels[0].grad is not None and float(s.levels[0].grad.abs().sum()) > 0
    assert all(p.grad is None for p in list(s.levels)[1:])
    opt.step()
    assert not torch.equal(s.levels[0], frozen[0])
    assert all(torch.equal(p, q) for p, q in zip(list(s.levels)[1:], frozen[1:]))


def test_pyramid_image_init_prefixes_are_coarse_approximations():
    x = _images(S=16)
    s = PyramidImages(_labels(), 16, x, grow_every=1)
    errors = []
    for step in range(s.num_levels):
        s.upkeep(step)
        errors.append(float((s.decode().detach() - x).abs().mean()))
    # the first level alone is a flat colour (not mid-grey), and each added level gets closer
    assert errors[-1] < 1e-5
    assert all(a >= b - 1e-6 for a, b in zip(errors, errors[1:]))
    s.upkeep(0)
    first = s.decode()
    assert torch.allclose(first, first.mean(dim=(2, 3), keepdim=True), atol=1e-6)
    assert not torch.allclose(first, torch.full_like(first, 0.5), atol=1e-2)


@pytest.mark.parametrize("param", PARAMS)
def test_gradients_reach_parameters(param):
    s = build_synthetic(param, _labels(), 8, _images(S=8), grow_every=0)
    s.decode().mul(torch.randn(5, 3, 8, 8)).sum().backward()
    for name, p in s.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


@pytest.mark.parametrize("param", PARAMS)
def test_gradcheck_decode(param):
    s = build_synthetic(param, _labels(2), 4, None, grow_every=0,
                        generator=torch.Generator().manual_seed(0)).double()
    params = list(s.parameters())
    names = [n for n, _ in s.named_parameters()]

    def fn(*ps):
        return torch.func.functional_call(s, dict(zip(names, ps)), (torch.tensor([1, 0]),))

    assert torch.autograd.gradcheck(fn, tuple(p.detach().requires_grad_() for p in params))


@pytest.mark.parametrize("param", PARAMS)
def test_decode_indices_equals_rows_of_full(param):
    s = build_synthetic(param, _labels(), 12, None, grow_every=0, generator=torch.Generator().manual_seed(2))
    full = s.decode()
    idx = torch.tensor([4, 0, 2, 2])
    # not bitwise: torch's elementwise CPU kernels compute a tensor's tail (past the last full vector) with scalar
    # code, so an element can round differently in a batch of another size
    torch.testing.assert_close(s.decode(idx), full[idx], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s.decode(torch.arange(5)), full, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("param", PARAMS)
def test_decode_indices_validation(param):
    s = build_synthetic(param, _labels(), 4, None)
    with pytest.raises(ValueError, match="indices"):
        s.decode(torch.tensor([5]))
    with pytest.raises(TypeError, match="indices"):
        s.decode(torch.tensor([0.0]))


@pytest.mark.parametrize("param", PARAMS)
def test_state_dict_round_trip(param):
    src = build_synthetic(param, _labels(), 8, None, grow_every=3, generator=torch.Generator().manual_seed(0))
    src.upkeep(7)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    dst = build_synthetic(param, _labels(), 8, None, grow_every=3, generator=torch.Generator().manual_seed(99))
    assert not torch.equal(dst.decode(), src.decode())
    dst.load_state_dict(state)
    assert torch.equal(dst.decode(), src.decode())
    assert torch.equal(dst.labels, src.labels)
    if param == "pyramid":
        assert dst.num_active == src.num_active == 3


def test_pyramid_state_dict_rejects_other_image_size():
    src = PyramidImages(_labels(), 8)
    dst = PyramidImages(_labels(), 12)
    with pytest.raises((ValueError, RuntimeError)):
        dst.load_state_dict(src.state_dict())


def test_build_synthetic_errors():
    with pytest.raises(ValueError, match="param"):
        build_synthetic("voxels", _labels(), 8, None)
    with pytest.raises(ValueError, match="init_images"):
        build_synthetic("pixel", _labels(), 8, torch.rand(5, 3, 9, 9))
    with pytest.raises(ValueError, match="image_size"):
        build_synthetic("pixel", _labels(), 0, None)
    with pytest.raises(TypeError, match="labels"):
        build_synthetic("pixel", torch.zeros(3), 8, None)
    with pytest.raises(ValueError, match="grow_every"):
        build_synthetic("pyramid", _labels(), 8, None, grow_every=-1)


def test_attributes():
    s = build_synthetic("pyramid", torch.tensor([0, 0, 1, 2]), 8, None)
    assert s.num_images == 4 and s.image_size == 8 and s.num_classes == 3
    assert s.labels.dtype == torch.long and "labels" in dict(s.named_buffers())
