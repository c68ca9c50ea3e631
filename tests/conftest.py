import os
import signal

import torch

# Settings of the machine that runs the suite must not change what it tests: a developer's CLPDD_* switches, or the
# variables of a job that torchrun started (in-process main() calls would try to join its process group).
MACHINE_ENV = ("CLPDD_AUTOTUNE", "CLPDD_CE_PRECISION", "CLPDD_RIDGE_PRECISION", "CLPDD_TRACEBACK", "WORLD_SIZE",
               "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
for _name in MACHINE_ENV:
    os.environ.pop(_name, None)

# Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter, which triton reads when kernels are
# decorated (at import): set it before any test module imports triton (timm and torch can import it too).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    # Triton 3.6's interpreter makes an index of a scalar (`range(0, n, BLOCK)` on a runtime argument) with int() of a
    # one-element 1-D array, which NumPy >= 2.5 refuses ("only 0-dimensional arrays can be converted to Python
    # scalars"); Triton 3.8 squeezes first. The same here, on every version.
    from triton.runtime import interpreter as _interpreter

    _patch_lang_tensor = getattr(_interpreter, "_patch_lang_tensor", None)   # private: absent elsewhere, nothing to do

    def _patch_lang_tensor_squeezed(tensor, scope):
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    if _patch_lang_tensor is not None:
        _interpreter._patch_lang_tensor = _patch_lang_tensor_squeezed


import numpy as np  # noqa: E402
import pytest  # noqa: E402

from clpdd_fast.datasets import write_idx  # noqa: E402
from helpers import TINY_MODEL  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_test(tmp_path_factory, monkeypatch):
    """What one test may not leak into another, nor take from the machine it runs on:
    - SIGINT is Python's KeyboardInterrupt handler, also when the suite was started in the background (a shell
      starts background jobs with SIGINT ignored, and subprocesses inherit that);
    - the Hugging Face and torch hub caches are empty folders (a developer's cached weights must not change which
      errors the weight-loading tests see);
    - the global torch random state is restored afterwards."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    caches = tmp_path_factory.mktemp("caches")
    monkeypatch.setenv("HF_HOME", str(caches / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(caches / "hf" / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(caches / "torch"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(caches / "hf" / "hub"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(caches / "torch" / "hub"))
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def tiny_idx(tmp_path_factory):
    """An IDX dataset of 4 classes of 12x12 grey images (a bright column band per class, plus noise):
    48 train and 24 test images."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("idx")
    for prefix, n in [("train", 48), ("t10k", 24)]:
        labels = np.arange(n, dtype=np.uint8) % 4
        base = np.zeros((n, 12, 12))
        for i, c in enumerate(labels):
            base[i, :, 3 * c:3 * c + 3] = 200
        images = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
        write_idx(str(folder / f"{prefix}-images-idx3-ubyte"), images)
        write_idx(str(folder / f"{prefix}-labels-idx1-ubyte"), labels)
    return folder


@pytest.fixture(scope="session")
def encoder():
    """The tiny encoder, frozen, on the CPU."""
    from clpdd_fast.encoders import build_encoder
    return build_encoder(TINY_MODEL, "none", "cpu")


@pytest.fixture(scope="session")
def broken_tree(tmp_path_factory):
    """An ImageFolder tree of random-noise images (odd sizes) with undecodable files: train a (4), b (1 + 3 bad),
    c (4 + 1 bad); val a (2 + 1 bad), b (2), c (2). Returns (root, {split: [bad paths]}, path of b's good image)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    root = tmp_path_factory.mktemp("broken")
    layout = {"train": {"a": 4 * "g", "b": "bgbb", "c": "ggbgg"}, "val": {"a": "gbg", "b": "gg", "c": "gg"}}
    bad = {"train": [], "val": []}
    for split, classes in layout.items():
        for name, kinds in classes.items():
            (root / split / name).mkdir(parents=True)
            for i, kind in enumerate(kinds):
                path = root / split / name / f"{i}.{'jpg' if i % 2 else 'png'}"
                h, w = (int(v) for v in rng.integers(9, 40, size=2))
                Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path)
                if kind == "b":  # truncated: the header is intact, the pixel data stops half way
                    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
                    bad[split].append(str(path))
    return root, bad, str(root / "train" / "b" / "1.jpg")
