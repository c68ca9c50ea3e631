"""What a distillation run leaves on disk: atomic writes, code-free loading, the checkpoint, metrics, the distilled set
and its picture."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor


# The process umask, read once at import (os.umask can only be read by setting it): files written through a temporary
# file get the permissions a plain open() would give them (mkstemp's are 0600), so shared outputs stay readable.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename over `path`: a crash leaves the old file or the new one, never half.
    The file gets the usual permissions (0666 less the umask)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_torch(obj, path: Path) -> None:
    def write(tmp):
        torch.save(obj, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # on disk before the rename, as in save_json: a checkpoint must survive a crash
    atomic_write(path, write)


# Lines of torch.load's weights_only error that say nothing about the file itself.
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def safe_torch_load(path: Path, what: str, allow: tuple = ()):
    """torch.load that never runs code from the file: files users exchange (distilled sets, checkpoints, weights) are
    unpickled with weights_only=True, which builds tensors and plain Python values (dict, list, str, numbers, ...)
    only and never calls a function the file names; `allow` adds plain-record classes (argparse.Namespace). Anything
    else is refused with a ValueError naming `what` (the argument that gave the path); so is an unreadable file."""
    scope = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5; on 2.4, allowed for the process
    if scope is None:
        torch.serialization.add_safe_globals(list(allow))
    try:
        with scope(list(allow)) if scope is not None else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # refused objects, truncated file, not a torch file
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        refused = next((line for line in lines if "GLOBAL" in line), None)
        if refused is not None:
            raise ValueError(f"{what}: refusing to load {path}: it holds objects other than tensors and plain Python "
                             f"values, and unpickling them could run code from the file ({refused})") from None
        detail = next((line for line in lines if not line.startswith(_TORCH_BOILERPLATE)), type(exc).__name__)
        raise ValueError(f"{what}: could not read {path}: not a file torch.save wrote, or truncated ({detail})") \
            from None


def load_torch(path: Path, what: str, keys: set[str]) -> dict:
    """A file written by save_torch (a distilled set, a checkpoint), read by safe_torch_load: a dict with `keys`."""
    obj = safe_torch_load(path, what)
    if not isinstance(obj, dict) or not keys <= set(obj):
        found = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{what}: {path} is not what python -m clpdd_fast.distill writes (expected a dict with "
                         f"{', '.join(sorted(keys))}; found {found})")
    return obj


def load_distilled(path: str, what: str = "--distilled") -> dict:
    """The distilled set `distill` wrote (a run folder or its distilled.pt), read by load_torch: a dict with images
    (m, 3, S, S), labels (m,), config (a dict) and path (the file read). `what` names the argument in errors
    (FileNotFoundError for a missing file, ValueError for one that is not a distilled set; the CLIs print them as an
    error line)."""
    p = Path(path)
    if p.is_dir():
        p = p / "distilled.pt"
    if not p.is_file():
        raise FileNotFoundError(f"{what}: {str(path)!r} is neither a distilled.pt file nor a run folder holding one")
    payload = load_torch(p, what, {"images", "labels", "config"})  # runs no code from the file
    images, labels = payload["images"], payload["labels"]
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor) \
            or not isinstance(payload["config"], dict):
        raise ValueError(f"{what}: {p}: expected images and labels tensors and a config dict, got "
                         f"{type(images).__name__}, {type(labels).__name__}, {type(payload['config']).__name__}")
    if images.dim() != 4 or images.shape[1] != 3 or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{what}: images {tuple(images.shape)} and labels {tuple(labels.shape)} "
                         f"do not form a set of (m, 3, S, S) images with m labels")
    payload["path"] = str(p)
    return payload


def save_json(obj, path: Path) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a progress record must survive a crash
    atomic_write(path, write)


def _row_step(path: Path, line: str, last: bool) -> float:
    """The step of a metrics row. Only the last row may be cut short (a run killed while appending it); it comes
    after the checkpoint (rows are appended before the checkpoint that covers them), so it counts as dropped."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError as exc:
        if last:
            return float("inf")
        raise ValueError(f"--resume: {path} is corrupt (a row before the last is not JSON: {exc})") from None


class MetricsLog:
    """metrics.jsonl, one JSON object per step; on resume, rows after the checkpoint's step are dropped so the
    log of a resumed run equals that of an uninterrupted one (timings aside)."""

    def __init__(self, path: Path, keep_until_step: int | None = None):
        self.path = Path(path)
        if keep_until_step is not None and self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            rows = [line for i, line in enumerate(lines)
                    if _row_step(self.path, line, last=i == len(lines) - 1) <= keep_until_step]
            atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(r + "\n" for r in rows)))
        elif keep_until_step is None:
            self.path.write_text("")

    def append(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def save_grid_png(images: Tensor, labels: Tensor, class_names: list[str], path: Path) -> None:
    """A grid of the distilled images, one row per class, each row captioned with its class name."""
    from PIL import Image, ImageDraw

    images = images.detach().float().clamp(0, 1).cpu()
    num_classes = len(class_names)
    per_class = [images[labels.cpu() == c] for c in range(num_classes)]
    cols = max(1, max(len(p) for p in per_class))
    size = images.shape[-1]
    cell = max(size, 32)
    label_w = 12 + 7 * max(len(n) for n in class_names)
    canvas = Image.new("RGB", (label_w + cols * (cell + 2), num_classes * (cell + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, imgs in enumerate(per_class):
        y0 = c * (cell + 2)
        draw.text((4, y0 + cell // 2 - 5), class_names[c], fill="black")
        for j, img in enumerate(imgs):
            arr = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            tile = Image.fromarray(arr).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (label_w + j * (cell + 2), y0))
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
