"""Differentiable image augmentations whose random draws can be replayed exactly.

The bounded-memory step (docs/METHOD.md, section 3) forwards all synthetic images once without autograd and then again chunk by
chunk with autograd; both passes must see the same augmentation of each image. So sampling and applying are split:

    params = augment.sample(m, generator, device)      # random draws for m images, a small dataclass
    out = augment.apply(images, params, image_size)    # deterministic given (images, params)
    out_chunk = augment.apply(images[idx], params.select(idx), image_size)   # == out[idx], bit for bit

Operations, in order (LGM's "standard" / the paper's "DSA"):
  1. random-resized-crop (scale 0.08-1 of the area, aspect ratio 3/4-4/3, torchvision's sampling with up to 10
     tries and the full image as fallback), with the horizontal flip (p = 0.5) folded into the same affine matrix;
     one ``affine_grid`` + bilinear ``grid_sample`` (align_corners=False; border padding, so samples in the outer
     half-pixel ring repeat the edge like F.interpolate instead of fading to black) produces the image_size x
     image_size result (the encoder's input resolution), differentiable w.r.t. the images;
  2. Gaussian noise, std 0.2, added with p = 0.5 per image, after the crop, in [0, 1] pixel space, not clamped.
The noise is replayed from a per-image 63-bit seed (kept on the CPU) rather than stored: storing it would cost
m x 3 x out x out floats (600 MB at ImageNet-1K, m = 1000, 224 px). Noise is drawn in float32 and cast to the images'
dtype, so the same params give the same noise for fp32, fp64 and bf16 images on one device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from clpdd_fast import validation as check

_MAX_CROP_TRIES = 10  # torchvision's RandomResizedCrop tries 10 times before its fallback


@dataclass(frozen=True)
class AugmentParams:
    """The random draws for B images.

    Attributes:
        flip: bool (B,), mirror horizontally.
        boxes: float32 (B, 4), crop boxes (x0, y0, w, h) as fractions of the image side, inside [0, 1]^2.
        noise: bool (B,), add Gaussian noise.
        seeds: int64 (B,) on the CPU, the seed of each image's noise.
    """
    flip: Tensor
    boxes: Tensor
    noise: Tensor
    seeds: Tensor

    def __len__(self) -> int:
        return int(self.flip.shape[0])

    def select(self, indices) -> "AugmentParams":
        """The parameters of a subset of images: a slice, a list, or an integer / bool tensor of indices."""
        if isinstance(indices, int):
            indices = [indices]
        if isinstance(indices, slice):
            return AugmentParams(self.flip[indices], self.boxes[indices], self.noise[indices], self.seeds[indices])
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        if idx.dtype not in (torch.int32, torch.int64) or idx.dim() != 1:
            raise TypeError(f"indices: expected a slice or a 1-D integer tensor, got dtype "
                            f"{str(idx.dtype).replace('torch.', '')} and shape {tuple(idx.shape)}")
        on_dev = idx.to(self.flip.device, torch.long)
        return AugmentParams(self.flip[on_dev], self.boxes[on_dev], self.noise[on_dev],
                             self.seeds[idx.to("cpu", torch.long)])

    __getitem__ = select

    @staticmethod
    def cat(parts: "list[AugmentParams]") -> "AugmentParams":
        """The draws of several batches, one after the other (as if sampled for their images together)."""
        return AugmentParams(*(torch.cat([getattr(p, f) for p in parts])
                               for f in ("flip", "boxes", "noise", "seeds")))

    def to(self, device) -> "AugmentParams":
        """Moves flip, boxes and noise flags; seeds stay on the CPU (they are read as Python ints)."""
        return AugmentParams(self.flip.to(device), self.boxes.to(device), self.noise.to(device), self.seeds)


class Augment:
    """A differentiable augmentation with replayable random parameters.

    Args:
        flip_p: probability of a horizontal flip.
        crop: apply random-resized-crop; if False the whole image is resized to image_size.
        scale: (min, max) fraction of the image area a crop covers.
        ratio: (min, max) aspect ratio w / h of a crop.
        noise_p: probability of adding Gaussian noise to an image.
        noise_std: standard deviation of that noise (pixel values are in [0, 1]).
    """

    def __init__(self, flip_p: float = 0.5, crop: bool = True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 noise_p: float = 0.5, noise_std: float = 0.2):
        for name, p in (("flip_p", flip_p), ("noise_p", noise_p)):
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"{name}: expected a probability in [0, 1], got {p}")
        if not (0.0 < scale[0] <= scale[1] <= 1.0):
            raise ValueError(f"scale: expected 0 < min <= max <= 1, got {tuple(scale)}")
        if not (0.0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio: expected 0 < min <= max, got {tuple(ratio)}")
        if noise_std < 0:
            raise ValueError(f"noise_std: expected >= 0, got {noise_std}")
        self.flip_p, self.crop = float(flip_p), bool(crop)
        self.scale, self.ratio = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1]))
        self.noise_p, self.noise_std = float(noise_p), float(noise_std)

    def __repr__(self) -> str:
        return (f"Augment(flip_p={self.flip_p}, crop={self.crop}, scale={self.scale}, ratio={self.ratio}, "
                f"noise_p={self.noise_p}, noise_std={self.noise_std})")

    @property
    def is_identity(self) -> bool:
        """True when apply only resizes (no flip, no crop, no noise)."""
        return self.flip_p == 0 and not self.crop and (self.noise_p == 0 or self.noise_std == 0)

    def sample(self, n: int, generator: torch.Generator, device=None) -> AugmentParams:
        """Draw the parameters of n images from ``generator`` (CPU or CUDA); results are put on ``device``.

        Every draw happens whether or not the option is enabled, so the generator advances by the same amount for
        every augmentation configuration (switching noise off does not change the crops of a seeded run).
        """
        check.integer("n", n, minimum=0)
        gdev = generator.device if generator is not None else torch.device("cpu")
        device = torch.device(device) if device is not None else gdev

        def uniform(*shape):
            return torch.rand(shape, generator=generator, device=gdev, dtype=torch.float64)

        flip = uniform(n) < self.flip_p
        noise = uniform(n) < self.noise_p
        seeds = torch.randint(0, 2 ** 62, (n,), generator=generator, device=gdev).cpu()

        # Random-resized-crop on a unit square, torchvision's recipe, vectorised over tries.
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * uniform(n, _MAX_CROP_TRIES)
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(lo + (hi - lo) * uniform(n, _MAX_CROP_TRIES))
        w, h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
        pos_x, pos_y = uniform(n, _MAX_CROP_TRIES), uniform(n, _MAX_CROP_TRIES)
        if self.crop:
            valid = (w <= 1.0) & (h <= 1.0)
            first = torch.where(valid, torch.arange(_MAX_CROP_TRIES, device=gdev), _MAX_CROP_TRIES).min(dim=1).values
            found = first < _MAX_CROP_TRIES
            pick = first.clamp(max=_MAX_CROP_TRIES - 1).unsqueeze(1)
            w, h = w.gather(1, pick).squeeze(1), h.gather(1, pick).squeeze(1)
            x0, y0 = (1 - w) * pos_x.gather(1, pick).squeeze(1), (1 - h) * pos_y.gather(1, pick).squeeze(1)
            # Fallback (torchvision): the central crop with the ratio clamped into bounds; for a square image and
            # a ratio range containing 1 that is the whole image.
            fb_ratio = min(max(1.0, self.ratio[0]), self.ratio[1])
            fb_w, fb_h = (1.0, 1.0 / fb_ratio) if fb_ratio >= 1 else (fb_ratio, 1.0)
            fb = torch.tensor([(1 - fb_w) / 2, (1 - fb_h) / 2, fb_w, fb_h], dtype=torch.float64, device=gdev)
            boxes = torch.stack([x0, y0, w, h], dim=1)
            boxes = torch.where(found.unsqueeze(1), boxes, fb)
        else:
            boxes = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64, device=gdev).expand(n, 4)
        return AugmentParams(flip.to(device), boxes.to(device=device, dtype=torch.float32).contiguous(),
                             noise.to(device), seeds)

    def theta(self, params: AugmentParams, dtype=torch.float32) -> Tensor:
        """(B, 2, 3) affine matrices mapping output to input coordinates in [-1, 1] (affine_grid's convention)."""
        x0, y0, w, h = params.boxes.to(dtype).unbind(1)
        sign = 1.0 - 2.0 * params.flip.to(dtype)  # -1 mirrors x inside the crop
        zero = torch.zeros_like(w)
        row_x = torch.stack([w * sign, zero, 2 * x0 + w - 1], dim=1)
        row_y = torch.stack([zero, h, 2 * y0 + h - 1], dim=1)
        return torch.stack([row_x, row_y], dim=1)

    def noise_for(self, params: AugmentParams, image_size: int, device, dtype, channels: int = 3) -> Tensor:
        """The (B, channels, out, out) noise of each image (zero where the noise flag is off), regenerated from its seed."""
        out = torch.zeros((len(params), channels, image_size, image_size), device=device, dtype=dtype)
        flags = params.noise.cpu().tolist()  # one small device-to-host copy per call
        for i, (on, seed) in enumerate(zip(flags, params.seeds.tolist())):
            if on:
                g = torch.Generator(device=device)
                g.manual_seed(int(seed))
                out[i] = torch.randn((channels, image_size, image_size), generator=g, device=device).to(dtype)
        return out

    def apply(self, images: Tensor, params: AugmentParams, image_size: int) -> Tensor:
        """Augment images (B, 3, S, S) with ``params`` (B images) to (B, 3, image_size, image_size).

        Differentiable w.r.t. images; deterministic given (images, params).
        """
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(f"images: expected a (B, C, S, S) tensor, got "
                             f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
        if len(params) != images.shape[0]:
            raise ValueError(f"params: expected parameters for {images.shape[0]} images, got {len(params)}; "
                             "use params.select(indices) for a chunk")
        check.integer("image_size", image_size, minimum=1)
        B, C = images.shape[:2]
        if self.flip_p == 0 and not self.crop:
            if images.shape[-2:] == (image_size, image_size):
                out = images
            else:
                out = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False,
                                    antialias=False)
        else:
            theta = self.theta(params.to(images.device), dtype=images.dtype)
            grid = F.affine_grid(theta, [B, C, image_size, image_size], align_corners=False)
            out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.noise_p > 0 and self.noise_std > 0:
            out = out + self.noise_std * self.noise_for(params, image_size, images.device, images.dtype, C)
        return out

    __call__ = apply


_PRESETS = {
    "none": dict(flip_p=0.0, crop=False, noise_p=0.0),
    "standard": dict(flip_p=0.5, crop=True, noise_p=0.5, noise_std=0.2),
    "flip_crop": dict(flip_p=0.5, crop=True, noise_p=0.0),
    "flip": dict(flip_p=0.5, crop=False, noise_p=0.0),
}


def build_augment(name: str, **overrides) -> Augment:
    """Create an augmentation by name, optionally overriding any Augment argument.

    Names: "none" (resize only), "standard" (flip p=0.5, random-resized-crop, noise std 0.2 p=0.5: the
    distillation default), "flip_crop" (flip + random-resized-crop: the evaluation protocol), "flip".
    """
    if name not in _PRESETS:
        raise ValueError(f"augment: expected one of {sorted(_PRESETS)}, got {name!r}")
    return Augment(**{**_PRESETS[name], **overrides})

