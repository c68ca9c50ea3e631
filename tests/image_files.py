"""Writers of small image datasets on disk for the dataset and feature-cache tests."""
import os

import numpy as np

from clpdd_fast.datasets import write_idx


def write_idx_set(root, n_train=12, n_test=6, h=8, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, h, h), dtype=np.uint8)
        labels = (np.arange(n) % 3).astype(np.uint8)
        ext = ".gz" if gz else ""
        write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte{ext}"), imgs)
        write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte{ext}"), labels)
        arrays[prefix] = (imgs, labels)
    return arrays


def write_broken_tree(root, seed=0):
    """An ImageFolder train split of 17 random-noise images of odd sizes in classes a (6), b (5), c (6); rows 8 (a
    truncated PNG), 12 (a truncated JPEG) and 16 (not an image) cannot be decoded. Returns {row: path}."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    bad = {8: ("b", "02.png", "png"), 12: ("c", "01.jpg", "jpeg"), 16: ("c", "05.png", "text")}
    row = 0
    for name, n in (("a", 6), ("b", 5), ("c", 6)):
        os.makedirs(root / "train" / name, exist_ok=True)
        for i in range(n):
            _, fname, kind = bad.get(row, (name, f"{i:02d}.{'jpg' if i % 2 else 'png'}", None))
            path = root / "train" / name / fname
            pixels = rng.integers(0, 256, size=(int(rng.integers(7, 15)), int(rng.integers(7, 15)), 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, "JPEG" if fname.endswith(".jpg") else "PNG")
            if kind == "text":
                path.write_bytes(b"this is not an image")
            elif kind is not None:
                raw = path.read_bytes()
                path.write_bytes(raw[:len(raw) // 2])
            row += 1
    return {r: str(root / "train" / c / f) for r, (c, f, _) in bad.items()}
