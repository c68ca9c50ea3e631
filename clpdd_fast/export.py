"""`python -m clpdd_fast.export`: a distilled set in formats that load without this package.

  python -m clpdd_fast.export --distilled runs/<run> --format imagefolder OUT   # OUT/<k>_<class>/<i>.png
  python -m clpdd_fast.export --distilled runs/<run> --format safetensors OUT   # one file: images, labels, metadata

The formats, described in clpdd_fast/formats.py with their writers (--help repeats the description):
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch import Tensor

from clpdd_fast import artifacts, formats
from clpdd_fast.cli import HelpFormatter, run_main
from clpdd_fast.config import RunConfig

def class_names_for(config: RunConfig, labels: Tensor) -> tuple[list[str], bool]:
    """The run's class names, or "0" .. "C-1" when its config has none (C: num_classes, else the largest label + 1);
    the flag says whether the fallback was taken."""
    if config.class_names is not None:
        return list(config.class_names), False
    count = config.num_classes if config.num_classes is not None else int(labels.max()) + 1 if len(labels) else 0
    return [str(c) for c in range(count)], True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clpdd_fast.export",
                                description=__doc__ + formats.__doc__.partition("\n\n")[2],
                                formatter_class=HelpFormatter)
    a = p.add_argument
    required = {"required": True, "default": argparse.SUPPRESS}   # no "(default: None)" in --help
    a("--distilled", **required, help="a distillation run folder or its distilled.pt")
    a("--format", **required, choices=formats.FORMATS,
      help="imagefolder (a folder of PNGs per class) or safetensors (one file)")
    a("--force", action="store_true", help="replace OUT if it exists (a folder only if an earlier export wrote it)")
    a("out", metavar="OUT", help="the folder (imagefolder) or file (safetensors) to write")
    return p


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    payload = artifacts.load_distilled(args.distilled)
    config = RunConfig.from_dict(payload["config"], f"--distilled {payload['path']}")
    images, labels = payload["images"], payload["labels"]
    names, fallback = class_names_for(config, labels)
    if fallback:
        print(f"note: {payload['path']} names no classes; they are named 0 .. {len(names) - 1}", file=sys.stderr)
    if args.format == "imagefolder":
        out = formats.write_imagefolder(images, labels, names, args.out, force=args.force)
    else:
        out = formats.write_safetensors(images, labels, names, config.to_dict(), args.out, force=args.force)
    print(f"wrote {len(labels)} images of {len(names)} classes to {out}")
    return out


if __name__ == "__main__":
    run_main(main)
