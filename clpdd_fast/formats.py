"""The distilled set in formats that load without this package: an ImageFolder tree of PNGs and one safetensors file.

imagefolder: one folder per class, named by the label index (zero-padded) and the class name with every character
other than letters, digits, '-', '.' and '_' replaced by '_' ("T-shirt/top", label 0 of 10: 0_T-shirt_top), so that
torchvision's ImageFolder, which sorts folder names, gives each image its original label; the exact names are in
OUT/class_names.json. Images are 8-bit RGB PNGs, round(255 x), numbered in their order within the class.
safetensors: `images` float32 (m, 3, S, S) in [0, 1] and `labels` int64 (m,) as saved, and string metadata: the run's
config and the class names as JSON, and the format version.
`distill` writes both into its run folder (distilled/ and distilled.safetensors); `python -m clpdd_fast.export`
writes them from a finished run.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch
from torch import Tensor

from clpdd_fast import artifacts
from clpdd_fast import validation as check

FORMATS = ("imagefolder", "safetensors")
FORMAT_VERSION = "1"
CLASS_NAMES_FILE = "class_names.json"   # in an ImageFolder tree: the exact names; also what --force looks for


def _check_set(images: Tensor, labels: Tensor, class_names: list[str]) -> None:
    if not isinstance(images, Tensor) or not images.is_floating_point() or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected a float tensor of shape (m, 3, S, S), got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    if len(images) == 0:
        raise ValueError("images: the set is empty")
    if not bool(torch.isfinite(images).all()) or float(images.min()) < 0 or float(images.max()) > 1:
        raise ValueError("images: expected finite values in [0, 1]")
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex() or labels.dim() != 1 \
            or len(labels) != len(images):
        raise ValueError(f"labels: expected an integer tensor of shape ({len(images)},), got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
    if not isinstance(class_names, (list, tuple)) or not all(isinstance(n, str) for n in class_names):
        raise TypeError(f"class_names: expected a list of strings, got {class_names!r:.80}")
    check.labels("labels", labels, len(class_names))   # one class name each


def folder_names(class_names: list[str]) -> list[str]:
    """Filesystem-safe folder names whose sorted order is the label order: '<label, zero-padded>_<safe name>'."""
    width = len(str(max(len(class_names) - 1, 0)))
    names = []
    for k, name in enumerate(class_names):
        safe = re.sub(r"[^\w.-]", "_", name).encode("utf-8")[:200].decode("utf-8", "ignore")  # < 255 bytes
        names.append(f"{k:0{width}d}_{safe}")
    return names


def _prepare(out: Path, force: bool, is_dir: bool) -> None:
    """Refuse to overwrite what this export did not write, unless --force (folders: only an earlier export)."""
    if out.exists() and out.is_dir() != is_dir:
        raise ValueError(f"OUT: {out} exists and is {'not ' if is_dir else ''}a folder")
    occupied = any(out.iterdir()) if is_dir and out.exists() else out.exists()
    if occupied and not force:
        raise ValueError(f"OUT: {out} exists{' and is not empty' if is_dir else ''}; pass --force to replace it")
    if occupied and is_dir and not (out / CLASS_NAMES_FILE).is_file():
        raise ValueError(f"OUT: --force replaces only a folder that an earlier export wrote (it holds "
                         f"{CLASS_NAMES_FILE}); {out} holds other files: choose another OUT")
    out.parent.mkdir(parents=True, exist_ok=True)


def _write_png(pixels, path: Path) -> None:
    from PIL import Image

    with open(path, "wb") as f:
        Image.fromarray(pixels).save(f, format="PNG")   # uint8 (S, S, 3): RGB
        f.flush()
        os.fsync(f.fileno())


def write_imagefolder(images: Tensor, labels: Tensor, class_names: list[str], out_dir, force: bool = False) -> Path:
    """Write the set as out_dir/<folder of class k>/<i>.png (folder_names: sorted folders = label order; i: the
    image's position within its class, zero-padded) plus out_dir/class_names.json. Pixels are round(255 x) as 8-bit
    RGB. A class without images gets an empty folder (torchvision's ImageFolder needs allow_empty=True for it).
    The tree is built beside out_dir and renamed into place when complete: a crash leaves no partial out_dir.
    force=True replaces an out_dir that an earlier export wrote; any other non-empty out_dir is refused."""
    _check_set(images, labels, class_names)
    out = Path(out_dir).resolve()   # a name to rename onto, also for "." or "a/.."
    _prepare(out, force, is_dir=True)
    pixels = (images.detach().cpu().double() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    labels = labels.detach().cpu().long()
    counts = torch.bincount(labels, minlength=len(class_names))
    width = len(str(max(int(counts.max()) - 1, 0)))
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.partial"
    tmp.mkdir()
    try:
        folders = folder_names(class_names)
        for folder in folders:
            (tmp / folder).mkdir()
        seen = [0] * len(class_names)
        for pix, label in zip(pixels, labels.tolist()):
            _write_png(pix, tmp / folders[label] / f"{seen[label]:0{width}d}.png")
            seen[label] += 1
        (tmp / CLASS_NAMES_FILE).write_text(json.dumps(list(class_names), ensure_ascii=False, indent=1) + "\n",
                                            encoding="utf-8")
        old = tmp.with_name(tmp.name[:-len(".partial")] + ".old")
        if out.exists():
            os.rename(out, old)   # empty, or an earlier export (force)
        os.rename(tmp, out)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def write_safetensors(images: Tensor, labels: Tensor, class_names: list[str], config: dict, path,
                      force: bool = False) -> Path:
    """Write `images` (float32, as given) and `labels` (int64) with string metadata: format, format_version, config
    (JSON of the run's settings) and class_names (JSON list in label order). Written atomically; an existing file is
    replaced only with force=True."""
    from safetensors.torch import save_file

    _check_set(images, labels, class_names)
    path = Path(path)
    _prepare(path, force, is_dir=False)
    tensors = {"images": images.detach().to("cpu", torch.float32).contiguous(),
               "labels": labels.detach().to("cpu", torch.int64).contiguous()}
    metadata = {"format": "clpdd-fast distilled set", "format_version": FORMAT_VERSION,
                "config": json.dumps(config, sort_keys=True), "class_names": json.dumps(list(class_names))}

    def write(tmp):
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    artifacts.atomic_write(path, write)
    return path
