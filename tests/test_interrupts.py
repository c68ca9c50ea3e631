"""Ctrl-C at any moment of a step, then --resume: the run ends exactly as an uninterrupted one (images, metrics)."""
import json
import signal
import subprocess
import sys

import pytest
import torch

from clpdd_fast import methods
from clpdd_fast.augment import Augment
from clpdd_fast.distill import main
from clpdd_fast.interrupts import Interrupts
from clpdd_fast.synthetic import PyramidImages

from helpers import run_args


def test_first_ctrl_c_waits_for_the_held_section_a_second_one_does_not():
    before = signal.getsignal(signal.SIGINT)
    with Interrupts() as interrupts:
        with pytest.raises(KeyboardInterrupt):  # outside a held section: at once
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    finished = []
    with Interrupts() as interrupts:
        with pytest.raises(KeyboardInterrupt):
            with interrupts.held():
                signal.raise_signal(signal.SIGINT)
                finished.append(True)  # reached: the first Ctrl-C waits for the end of the section
        assert finished and not interrupts.aborted
        with pytest.raises(KeyboardInterrupt):
            with interrupts.held():
                signal.raise_signal(signal.SIGINT)  # the second one cuts the section
                finished.append(False)
        assert finished == [True] and interrupts.aborted


def test_an_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a job started in the background with nohup
    try:
        with Interrupts() as interrupts:
            with interrupts.held():
                signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and interrupts.presses == 0
    finally:
        signal.signal(signal.SIGINT, previous)


ITERATIONS = 4
# Pyramid levels grow at steps 2 and 4 (upkeep matters), a sampled real batch and the augmentation draw from the
# generator, two encoder chunks per pass: every kind of state a step changes. Checkpoints at steps 2 and 4.
COMMON = ("--augment", "standard", "--param", "pyramid", "--grow-every", "2", "--real-batch", "20", "--ipc", "1",
          "--encoder-batch", "2", "--seed", "3", "--checkpoint-every", "2")


def metrics(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def reference(tiny_idx, tmp_path_factory):
    """An uninterrupted run: its distilled images and metrics, and the feature cache the other runs share."""
    root = tmp_path_factory.mktemp("interrupt")
    main(run_args(tiny_idx, root / "ref", root / "cache", "--iterations", str(ITERATIONS), *COMMON))
    return {"cache": root / "cache", "images": torch.load(root / "ref" / "distilled.pt")["images"],
            "metrics": metrics(root / "ref")}


def act_on_calls(monkeypatch, owner, name, plan: dict):
    """Make owner.name, on its n-th call and after doing its work, 'raise' a KeyboardInterrupt or send this process
    plan[n].count('sigint') real SIGINTs (signal.raise_signal runs the Python handler before returning)."""
    original = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls[0] += 1
        what = plan.get(calls[0], "")
        if what == "raise":
            raise KeyboardInterrupt
        for _ in range(what.count("sigint")):
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(owner, name, wrapper)


# (what to patch, {call: action}, steps in the checkpoint afterwards, "interrupted" or "aborted").
# Per step: 1 augmentation draw, 4 encoder passes (2 chunks without, then 2 with autograd), 1 outer loss, 1 Adam
# step, 1 upkeep; torch.save: 1 per checkpoint (steps 2 and 4, and the one written on interruption).
CASES = {
    # inside the step's forward/backward: the step is dropped, the generators rewound, the last completed step saved
    "raise after the 2nd augmentation draw": ([(Augment, "sample", {2: "raise"})], 1, "interrupted"),
    "sigint in the 1st step's re-forward": ([(methods, "_features", {3: "sigint"})], 0, "interrupted"),
    "sigint after the 4th outer loss": ([(methods, "clpdd_loss", {4: "sigint"})], 3, "interrupted"),
    # inside the commit: a first Ctrl-C waits for the step to finish
    "sigint in the 1st Adam step": ([(torch.optim.Adam, "step", {1: "sigint"})], 1, "interrupted"),
    "sigint in the 3rd upkeep": ([(PyramidImages, "upkeep", {3: "sigint"})], 3, "interrupted"),
    "sigint while writing checkpoint 2": ([(torch, "save", {1: "sigint"})], 2, "interrupted"),
    # a second Ctrl-C aborts at once, saves nothing, and leaves the last checkpoint whole
    "two sigints in the 3rd Adam step": ([(torch.optim.Adam, "step", {3: "sigint sigint"})], 2, "aborted"),
    "second sigint while saving step 3": ([(Augment, "sample", {4: "sigint"}), (torch, "save", {2: "sigint"})], 2,
                                          "aborted"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_interrupt_anywhere_then_resume_equals_uninterrupted(tiny_idx, tmp_path, monkeypatch, capsys, reference,
                                                             case):
    patches, saved_step, outcome = CASES[case]
    out = tmp_path / "run"
    args = run_args(tiny_idx, out, reference["cache"], "--iterations", str(ITERATIONS), *COMMON)
    handler = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as patch:
        for owner, name, plan in patches:
            act_on_calls(patch, owner, name, plan)
        with pytest.raises(SystemExit) as stop:
            main(args)
    assert stop.value.code == 130
    assert outcome in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is handler  # the loop's handler is gone
    assert torch.load(out / "checkpoint.pt")["step"] == saved_step
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]  # no temp file

    main(args + ["--resume"])
    assert torch.equal(torch.load(out / "distilled.pt")["images"], reference["images"])
    assert metrics(out) == reference["metrics"]


_SIGINT_IN_STEP_2 = """
import runpy, signal, sys
import clpdd_fast.methods as methods
features, calls = methods._features, [0]
def interrupted(*args, **kwargs):
    result = features(*args, **kwargs)
    calls[0] += 1
    if calls[0] == 7:  # step 2, the first chunk's re-forward
        signal.raise_signal(signal.SIGINT)
    return result
methods._features = interrupted
sys.argv = ["clpdd"] + sys.argv[1:]
runpy.run_module("clpdd_fast.distill", run_name="__main__")
"""


def test_command_line_ctrl_c_exits_130_and_resumes_exactly(tiny_idx, tmp_path, reference):
    out = tmp_path / "run"
    args = run_args(tiny_idx, out, reference["cache"], "--iterations", str(ITERATIONS), *COMMON)
    proc = subprocess.run([sys.executable, "-c", _SIGINT_IN_STEP_2, *args], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "resume with" in proc.stderr and "Traceback" not in proc.stderr
    assert torch.load(out / "checkpoint.pt")["step"] == 1
    main(args + ["--resume"])
    assert torch.equal(torch.load(out / "distilled.pt")["images"], reference["images"])
    assert metrics(out) == reference["metrics"]
