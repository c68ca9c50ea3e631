"""The outer objective of each distillation method, one function each; every one fills the synthetic parameters'
.grad and returns the loss, so they plug into the same loop in distill.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from clpdd_fast import settings
from clpdd_fast import validation as check
from clpdd_fast.augment import Augment
from clpdd_fast.distributed import World
from clpdd_fast.feature_transform import FeatureTransform
from clpdd_fast.ops import clpdd_loss
from clpdd_fast.profiling import nvtx_range
from clpdd_fast.synthetic import SyntheticImages


@dataclass
class ClpddInputs:
    """What CLP-DD's outer loss needs: the real side (under torchrun, this rank's shard) and the probe settings."""
    real_features: Tensor       # (N, d) transformed real features on the compute device (fp16/bf16/fp32)
    real_labels: Tensor         # (N,) int64 on the same device
    transform: FeatureTransform
    lam: float
    tau: float
    outer: str = "ce"
    real_batch: int | None = None  # rows of real features sampled per step (over all ranks); None = all
    real_share: float = 1.0     # this rank's fraction of all real rows (its weight in the mean over them)


@dataclass
class LgmInputs:
    """What LGM needs: real pixels every step."""
    real_images: Callable[[int, torch.Generator], tuple[Tensor, Tensor]]  # (n, generator) -> (images in [0,1], labels)
    augs_per_batch: int = 10    # augmented copies K of the synthetic set per step


@dataclass
class StepInputs:
    """What one outer step needs besides the synthetic images; built once by the loop. Every method uses the
    encoder fields; `clpdd` and `lgm` hold each method's own inputs (the loop fills only the one it runs)."""
    encoder: torch.nn.Module
    augment: Augment
    image_size: int             # encoder input resolution (after augmentation)
    num_classes: int
    encoder_batch: int = 64     # synthetic images per encoder pass (bounds memory)
    autocast_dtype: torch.dtype | None = None  # e.g. torch.bfloat16 for the encoder passes
    clpdd: ClpddInputs | None = None
    lgm: LgmInputs | None = None
    world: World = World()      # torchrun ranks (see distributed.py); a single process by default


def _own_inputs(inputs: StepInputs, method: str):
    """inputs.clpdd or inputs.lgm, which the loop fills for the method it runs."""
    own = getattr(inputs, method)
    if own is None:
        needs = ("the real features: StepInputs(clpdd=ClpddInputs(real_features=..., ...))" if method == "clpdd" else
                 "real images every step: StepInputs(lgm=LgmInputs(real_images=...))")
        raise ValueError(f"inputs.{method}: the {method} step needs {needs}, got None")
    return own


def _chunks(start: int, stop: int, encoder_batch: int, device) -> list[Tensor]:
    return [torch.arange(s, min(s + encoder_batch, stop), device=device) for s in range(start, stop, encoder_batch)]


def _features(images: Tensor, inputs: StepInputs) -> Tensor:
    with torch.autocast(images.device.type, dtype=inputs.autocast_dtype or torch.float32,
                        enabled=inputs.autocast_dtype is not None):
        out = inputs.encoder(images)
    return out if out.dtype == torch.float64 else out.float()  # float64 encoders (tests) keep their precision


def _encode(synthetic: SyntheticImages, inputs: StepInputs, idx: Tensor, aug_params) -> Tensor:
    with nvtx_range("decode_augment"):
        images = inputs.augment.apply(synthetic.decode(idx), aug_params.select(idx), inputs.image_size)
    with nvtx_range("encoder"):
        return _features(images, inputs)


def _outer_loss(phi_s: Tensor, synthetic: SyntheticImages, inputs: StepInputs,
                generator: torch.Generator) -> Tensor:
    """CLP-DD's loss of raw synthetic features phi_s on all real rows or on a sampled batch of them
    (real_batch * real_share rows of this rank's shard)."""
    own = _own_inputs(inputs, "clpdd")
    real_x, real_y = own.real_features, own.real_labels
    # One draw from the shared generator seeds this rank's row sample, so the shared generator advances alike on
    # every rank (and the augmentation draws stay identical) whatever the shard sizes.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    if own.real_batch is not None:
        batch = max(1, round(own.real_batch * own.real_share))
        if batch < real_x.shape[0]:
            local = torch.Generator().manual_seed(seed + inputs.world.rank)
            rows = torch.randperm(real_x.shape[0], generator=local)[:batch].to(real_x.device)
            real_x, real_y = real_x[rows], real_y[rows]
    # The real features are constants checked once when the loop is built (distill.py); only the synthetic side is
    # checked here, every step: a NaN there means the run diverged.
    check.finite("synthetic features", phi_s)
    return clpdd_loss(own.transform(phi_s), synthetic.labels, real_x, real_y, own.lam, own.tau,
                      outer=own.outer, num_classes=inputs.num_classes, precision=ce_precision(), check_finite=False)


def ce_precision() -> str | None:
    """The CE's precision in a run: "high" (a bf16 feature cache against the fp32 probe as two bf16 halves of the
    probe on tensor cores; fp16 and fp32 features stay exact), unless CLPDD_CE_PRECISION says otherwise (None: the
    op reads it)."""
    return None if settings.is_set("CLPDD_CE_PRECISION") else "high"


def clpdd_step(synthetic: SyntheticImages, inputs: StepInputs, generator: torch.Generator) -> Tensor:
    """One bounded-memory CLP-DD step (docs/METHOD.md, section 3): returns the loss and accumulates d loss / d parameters.

    1. forward all m synthetic images through the encoder without autograd, chunk by chunk -> phi_s;
    2. ridge probe of phi_s, CE (or MSE) on the real features, backward to d loss / d phi_s only;
    3. re-run each chunk with autograd and the same augmentation, backpropagating its rows of d loss / d phi_s.
    Peak memory: one chunk's activations plus O(m d + min(m, d)^2 + d C), independent of m's activations.
    """
    m = synthetic.num_images
    device = synthetic.labels.device
    world = inputs.world
    aug_params = inputs.augment.sample(m, generator, device)
    chunks = _chunks(*world.block(m), inputs.encoder_batch, device)  # this rank's images (all, in one process)
    with torch.no_grad(), nvtx_range("encoder_forward"):
        own = [_encode(synthetic, inputs, idx, aug_params) for idx in chunks]
        phi_s = world.gather_rows(torch.cat(own), m)
    phi_s.requires_grad_(True)
    with nvtx_range("outer_loss"):  # ridge_solve and linear_softmax_ce open their own ranges inside
        loss = _outer_loss(phi_s, synthetic, inputs, generator) * _own_inputs(inputs, "clpdd").real_share
    with nvtx_range("loss_backward"):
        (grad_phi,) = torch.autograd.grad(loss, phi_s)
        loss = world.sum_(loss.detach())
        world.sum_(grad_phi)  # the mean over all real rows is the share-weighted sum of the ranks' means
    for idx in chunks:
        with nvtx_range("encoder_reforward"):
            features = _encode(synthetic, inputs, idx, aug_params)
        with nvtx_range("encoder_backward"):
            features.backward(grad_phi[idx])
    world.sum_grads_(synthetic.parameters())
    return loss


def clpdd_loss_plain(synthetic: SyntheticImages, inputs: StepInputs, generator: torch.Generator) -> Tensor:
    """The same loss as clpdd_step through one ordinary autograd graph (all m images at once): the test oracle
    for the chunked recomputation, and a reference for users who want to see the objective in one expression."""
    m = synthetic.num_images
    device = synthetic.labels.device
    aug_params = inputs.augment.sample(m, generator, device)
    phi_s = _encode(synthetic, inputs, torch.arange(m, device=device), aug_params)
    return _outer_loss(phi_s, synthetic, inputs, generator)


# ------------------------------------------------------------------------------------------------------------- LGM
LGM_HEAD_STD = 0.01  # LGM's random linear head: weights ~ N(0, 0.01^2), zero bias, redrawn every step


def lgm_draws(synthetic: SyntheticImages, inputs: StepInputs, generator: torch.Generator):
    """The random draws of one LGM step, in the order lgm_step makes them (tests replay them from a cloned generator):
    a real batch of K * m images with its labels, their augmentation, the augmentation of K copies of the m synthetic
    images. Returns (real_images, real_labels, real_params, synthetic_params)."""
    own = _own_inputs(inputs, "lgm")
    check.integer("inputs.lgm.augs_per_batch", own.augs_per_batch, minimum=1)
    n = own.augs_per_batch * synthetic.num_images
    device = synthetic.labels.device
    real_images, real_labels = own.real_images(n, generator)
    real_params = inputs.augment.sample(n, generator, device)
    synthetic_params = inputs.augment.sample(n, generator, device)
    return real_images.to(device), real_labels.to(device), real_params, synthetic_params


def lgm_step(synthetic: SyntheticImages, inputs: StepInputs, generator: torch.Generator) -> Tensor:
    """One step of Linear Gradient Matching (Cazenavette et al.): returns the loss and accumulates its gradient.

    A fresh random linear head (W ~ N(0, 0.01^2) of shape (d, C), b = 0) is drawn; g_real = d CE / d[W, b] on a batch
    of K * m augmented real images (no graph), g_syn = the same on K augmented copies of the m synthetic images (with
    graph); loss = 1 - cos(flatten(g_real), flatten(g_syn)), backpropagated through g_syn (a double backward through
    the encoder) into the synthetic parameters. K = inputs.lgm.augs_per_batch. Not memory-bounded: all K * m synthetic
    images' activations and their double-backward graph are alive at once (that is LGM's cost, which CLP-DD avoids).
    """
    K = _own_inputs(inputs, "lgm").augs_per_batch
    real_images, real_labels, real_params, synthetic_params = lgm_draws(synthetic, inputs, generator)
    with torch.no_grad(), nvtx_range("lgm_real_forward"):
        phi_r = _features(inputs.augment.apply(real_images, real_params, inputs.image_size), inputs)
    d = phi_r.shape[1]
    weight = (torch.randn(d, inputs.num_classes, generator=generator) * LGM_HEAD_STD).to(phi_r.device, phi_r.dtype)
    weight.requires_grad_(True)
    bias = torch.zeros(inputs.num_classes, device=phi_r.device, dtype=phi_r.dtype, requires_grad=True)
    loss_real = F.cross_entropy(phi_r @ weight + bias, real_labels)
    g_real = torch.autograd.grad(loss_real, [weight, bias])
    with nvtx_range("lgm_synthetic_forward"):
        images = synthetic.decode().repeat(K, 1, 1, 1)  # copy k of image i is row k * m + i
        phi_s = _features(inputs.augment.apply(images, synthetic_params, inputs.image_size), inputs)
    loss_syn = F.cross_entropy(phi_s @ weight + bias, synthetic.labels.repeat(K))
    g_syn = torch.autograd.grad(loss_syn, [weight, bias], create_graph=True)
    loss = 1 - F.cosine_similarity(torch.cat([g.flatten() for g in g_real]),
                                   torch.cat([g.flatten() for g in g_syn]), dim=0)
    with nvtx_range("lgm_double_backward"):
        loss.backward()
    return loss.detach()


# The objectives by name: the loop (distill.py) runs METHODS[--method], with inputs.<method> filled.
METHODS = {"clpdd": clpdd_step, "lgm": lgm_step}
