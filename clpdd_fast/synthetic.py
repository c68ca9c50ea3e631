"""Synthetic-image parameterisations: what the distillation optimises, and how it becomes images.

Two parameterisations share one base class (docs/METHOD.md, "Inherited from LGM's recipe"):

- ``PixelImages``: one logit tensor per image, shape (m, 3, S, S).
- ``PyramidImages``: a Laplacian-style pyramid of logit tensors at 1x1, 2x2, 4x4, ... and finally S x S; every level
  is upsampled bilinearly to S x S and the active levels are summed. Coarse levels let early steps move colour and
  layout; a finer level joins every ``grow_every`` optimiser steps.

Both decode the same way after that: optional colour decorrelation (a fixed 3x3 mixing of the channels) and
``sigmoid(2 x)``, so images always lie in [0, 1] and the parameters live in an unbounded space.

Optimiser contract: every pyramid level is an ``nn.Parameter`` from construction on. An inactive level is not used by
``decode``, so it receives no gradient (``grad is None``) and ``torch.optim.Adam`` leaves it and its state untouched
until the level is activated. Build the optimiser once over ``module.parameters()``; ``upkeep`` never changes the
parameter set and therefore always returns False. (Use ``zero_grad(set_to_none=True)``, the default: zero-filled
gradients would advance Adam's per-parameter step count for inactive levels.)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clpdd_fast import validation as check

# Lucid's colour-correlation square root, the matrix docs/METHOD.md gives (section 5); columns are normalised below.
_COLOR_CORRELATION = [[0.26, 0.09, 0.02],
                      [0.27, 0.00, -0.05],
                      [0.27, -0.09, 0.03]]

# decode(x) = sigmoid(2 * x); the inverse of a pixel value y is logit(y) / 2.
_SIGMOID_SCALE = 2.0
# Pixel values are clamped into [eps, 1 - eps] before inversion so that 0 and 1 map to finite logits (+-4.6).
_INIT_EPS = 1e-4
# Standard deviation of the logits when initialising from noise (images start near mid-grey with small texture).
_NOISE_STD = 0.1


def color_decorrelation_matrix(dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """The 3x3 matrix M with rgb = M @ x per pixel: docs/METHOD.md's matrix divided by its largest column norm."""
    m = torch.tensor(_COLOR_CORRELATION, dtype=torch.float64)
    m = m / m.norm(dim=0).max()
    return m.to(dtype=dtype, device=device)


def _check_labels(labels) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError(f"labels: expected a non-empty 1-D tensor, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dtype.is_complex:
        raise TypeError(f"labels: expected an integer tensor, got {str(labels.dtype).replace('torch.', '')}")
    check.labels("labels", labels, None)
    return labels.detach().to(torch.long).clone()


def _check_image_size(image_size) -> int:
    return check.integer("image_size", image_size, minimum=1)


def _check_init_images(init_images, num_images: int, image_size: int) -> Tensor:
    if not isinstance(init_images, Tensor):
        raise TypeError(f"init_images: expected a torch.Tensor or None, got {type(init_images).__name__}")
    expected = (num_images, 3, image_size, image_size)
    if tuple(init_images.shape) != expected:
        raise ValueError(f"init_images: expected shape {expected} (one image per label, RGB, image_size), "
                         f"got {tuple(init_images.shape)}")
    if not init_images.dtype.is_floating_point:
        raise TypeError(f"init_images: expected a float tensor in [0, 1], got "
                        f"{str(init_images.dtype).replace('torch.', '')}")
    if not bool(torch.isfinite(init_images).all()):
        raise ValueError("init_images: contains NaN or inf")
    return init_images


def _noise(shape, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=device).cpu()


class SyntheticImages(nn.Module):
    """Base class: m synthetic images with hard labels, decoded to (k, 3, S, S) float images in [0, 1].

    Attributes:
        labels: LongTensor (m,), a buffer (saved in the state dict, moved by ``.to``).
        num_images: m.
        image_size: S.
        decorrelate: whether the colour decorrelation matrix mixes the channels before the sigmoid.
    """

    def __init__(self, labels: Tensor, image_size: int, decorrelate: bool = True):
        super().__init__()
        self.register_buffer("labels", _check_labels(labels))
        self.image_size = _check_image_size(image_size)
        self.decorrelate = bool(decorrelate)
        # Non-persistent: a constant, rebuilt from code, so old checkpoints never carry a stale copy.
        self.register_buffer("color_matrix", color_decorrelation_matrix(), persistent=False)

    @property
    def num_images(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        """1 + the largest label (classes are 0-based)."""
        return int(self.labels.max()) + 1

    # ----- the shared tail of decoding -------------------------------------------------------------------------
    def _to_rgb(self, logits: Tensor) -> Tensor:
        """(k, 3, S, S) unconstrained logits -> (k, 3, S, S) images in [0, 1]."""
        if self.decorrelate:
            logits = torch.einsum("ij,kjhw->kihw", self.color_matrix.to(logits.dtype), logits)
        return torch.sigmoid(_SIGMOID_SCALE * logits)

    def _from_rgb(self, images: Tensor) -> Tensor:
        """Inverse of ``_to_rgb`` for images clamped into [eps, 1 - eps]; returns float32 logits."""
        x = images.detach().to(torch.float64).clamp(_INIT_EPS, 1.0 - _INIT_EPS)
        x = torch.logit(x) / _SIGMOID_SCALE
        if self.decorrelate:
            inv = torch.linalg.inv(color_decorrelation_matrix(torch.float64, x.device))
            x = torch.einsum("ij,kjhw->kihw", inv, x)
        return x.to(torch.float32)

    def _check_indices(self, indices) -> Tensor | None:
        if indices is None:
            return None
        if not isinstance(indices, Tensor):
            indices = torch.as_tensor(indices)
        if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1:
            raise TypeError(f"indices: expected a 1-D integer tensor or None, got dtype "
                            f"{str(indices.dtype).replace('torch.', '')} and shape {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < -self.num_images or int(indices.max()) >= self.num_images):
            raise ValueError(f"indices: expected values in [0, {self.num_images}), got "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        return indices.to(device=self.labels.device, dtype=torch.long)

    # ----- the interface the loop uses --------------------------------------------------------------------------
    def decode(self, indices: Tensor | None = None) -> Tensor:
        """Images (k, 3, S, S) in [0, 1], differentiable w.r.t. the parameters.

        Args:
            indices: LongTensor (k,) of image indices, or None for all m images (k = m).
        """
        raise NotImplementedError

    def forward(self, indices: Tensor | None = None) -> Tensor:
        return self.decode(indices)

    def upkeep(self, step: int) -> bool:
        """Called after each optimiser step with the number of completed steps. Returns True only if the set of
        parameters changed (the caller would then rebuild its optimiser); no class here ever changes it."""
        return False

    @torch.no_grad()
    def images(self) -> Tensor:
        """All m images, detached, float32 on the parameters' device: what gets saved as the distilled set."""
        return self.decode().detach().float()


class PixelImages(SyntheticImages):
    """One logit per pixel and channel: parameter ``logits`` of shape (m, 3, S, S), float32.

    decode(x) = sigmoid(2 * M x) with M the colour decorrelation matrix (identity when ``decorrelate`` is False).
    Initialisation: from images in [0, 1] by the exact inverse of decode (values clamped into [1e-4, 1 - 1e-4]),
    or, with ``init_images=None``, from Gaussian noise of std 0.1 on the logits.
    """

    def __init__(self, labels: Tensor, image_size: int, init_images: Tensor | None = None, decorrelate: bool = True,
                 generator: torch.Generator | None = None):
        super().__init__(labels, image_size, decorrelate)
        shape = (self.num_images, 3, self.image_size, self.image_size)
        if init_images is None:
            logits = _noise(shape, generator) * _NOISE_STD
        else:
            logits = self._from_rgb(_check_init_images(init_images, self.num_images, self.image_size)).cpu()
        self.logits = nn.Parameter(logits.to(self.labels.device))

    def decode(self, indices: Tensor | None = None) -> Tensor:
        idx = self._check_indices(indices)
        logits = self.logits if idx is None else self.logits.index_select(0, idx)
        return self._to_rgb(logits)


def pyramid_sizes(image_size: int) -> list[int]:
    """Level resolutions: 1, 2, 4, ... while below image_size, then image_size itself (e.g. 224 -> ..., 128, 224)."""
    image_size = _check_image_size(image_size)
    sizes, s = [], 1
    while s < image_size:
        sizes.append(s)
        s *= 2
    sizes.append(image_size)
    return sizes


class PyramidImages(SyntheticImages):
    """A multi-resolution sum of logit tensors: ``levels[k]`` has shape (m, 3, s_k, s_k), s_k = pyramid_sizes(S)[k].

    decode = sigmoid(2 * M * sum_{k < active} upsample_bilinear(levels[k], S)).
    Growth schedule: after ``step`` completed optimiser steps, ``1 + step // grow_every`` levels are active (capped
    at the number of levels), so 1x1 alone for the first ``grow_every`` steps, then 2x2 joins, and so on
    (LGM: a new level every 200 steps). ``grow_every=0`` activates every level from the start.
    The active count is saved in the state dict (extra state), so it survives ``state_dict`` / ``load_state_dict``.

    Initialisation from images: the inverse-decoded target logits are split across the levels coarse to fine,
    each level taking the area-downsampled residual that the coarser levels leave. Every prefix of levels is then the
    best coarse approximation the schedule can show (the first steps see a blurred version of the image, not grey),
    and with all levels active decode reproduces the image exactly (the finest level is full resolution).
    From noise: Gaussian noise of std 0.1 / sqrt(number of levels) on every level, so the summed logits have std
    about 0.1 once all levels are active.
    """

    def __init__(self, labels: Tensor, image_size: int, init_images: Tensor | None = None, decorrelate: bool = True,
                 grow_every: int = 200, generator: torch.Generator | None = None):
        super().__init__(labels, image_size, decorrelate)
        self.grow_every = check.integer("grow_every", grow_every, minimum=0)   # 0: all levels active from the start
        self.sizes = pyramid_sizes(self.image_size)
        m, S = self.num_images, self.image_size
        if init_images is None:
            std = _NOISE_STD / math.sqrt(len(self.sizes))
            levels = [_noise((m, 3, s, s), generator) * std for s in self.sizes]
        else:
            target = self._from_rgb(_check_init_images(init_images, m, S)).cpu()
            levels, approx = [], torch.zeros_like(target)
            for s in self.sizes:
                # Area downsampling is the mean over each block: the least-squares fit of the residual at this size.
                level = F.interpolate(target - approx, size=(s, s), mode="area") if s != S else target - approx
                levels.append(level)
                approx = approx + self._upsample(level)
        device = self.labels.device
        self.levels = nn.ParameterList([nn.Parameter(t.to(device)) for t in levels])
        # A Python int, not a buffer: decode reads it every call and a CUDA scalar would force a device sync.
        # It travels in the state dict through get_extra_state / set_extra_state.
        self.active_levels = self.active_for_step(0)

    @property
    def num_levels(self) -> int:
        return len(self.sizes)

    @property
    def num_active(self) -> int:
        return self.active_levels

    def get_extra_state(self) -> dict:
        return {"active_levels": self.active_levels, "grow_every": self.grow_every, "sizes": list(self.sizes)}

    def set_extra_state(self, state: dict) -> None:
        if list(state["sizes"]) != self.sizes:
            raise ValueError(f"state_dict: pyramid level sizes {list(state['sizes'])} do not match this module's "
                             f"{self.sizes} (different image_size)")
        self.active_levels = int(state["active_levels"])

    def _upsample(self, level: Tensor) -> Tensor:
        if level.shape[-1] == self.image_size:
            return level
        return F.interpolate(level, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)

    def active_for_step(self, step: int) -> int:
        """Number of active levels after ``step`` completed optimiser steps."""
        if self.grow_every == 0:
            return self.num_levels
        return min(self.num_levels, 1 + max(0, int(step)) // self.grow_every)

    def upkeep(self, step: int) -> bool:
        """Activates the levels due after ``step`` completed steps. All levels are parameters from the start,
        so the parameter set never changes: returns False (no optimiser rebuild needed)."""
        self.active_levels = self.active_for_step(step)
        return False

    def decode(self, indices: Tensor | None = None) -> Tensor:
        idx = self._check_indices(indices)
        total = None
        for level in list(self.levels)[: self.num_active]:
            part = self._upsample(level if idx is None else level.index_select(0, idx))
            total = part if total is None else total + part
        return self._to_rgb(total)


def build_synthetic(param: str, labels: Tensor, image_size: int, init_images: Tensor | None = None,
                    decorrelate: bool = True, grow_every: int = 200,
                    generator: torch.Generator | None = None) -> SyntheticImages:
    """Create the synthetic set.

    Args:
        param: "pixel" or "pyramid".
        labels: integer tensor (m,), the class of each synthetic image.
        image_size: S, the side of the decoded square images.
        init_images: float tensor (m, 3, S, S) in [0, 1] to start from (e.g. random real images of each class),
            or None to start from noise.
        decorrelate: mix channels with the colour decorrelation matrix before the sigmoid.
        grow_every: pyramid only: optimiser steps between level activations (0 = all levels active at once).
        generator: torch.Generator for the noise initialisation (reproducible runs), or None for the global RNG.
    The module is created on the labels' device (move it with ``.to`` as usual).
    """
    if param == "pixel":
        return PixelImages(labels, image_size, init_images, decorrelate, generator=generator)
    if param == "pyramid":
        return PyramidImages(labels, image_size, init_images, decorrelate, grow_every=grow_every, generator=generator)
    raise ValueError(f"param: expected one of ['pixel', 'pyramid'], got {param!r}")
