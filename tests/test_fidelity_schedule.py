"""benchmarks/fidelity_schedule.py: the schedule study's bookkeeping (step seconds, equal-time lookup, report)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fidelity_schedule as fs  # noqa: E402


def test_step_seconds_sums_the_steps_up_to_n(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text("".join(json.dumps({"step": s, "loss": 1.0, "step_time_s": 0.5 * s, "step_cpu_s": 0.25})
                         + "\n" for s in (1, 2, 3, 4)))
    assert fs.step_seconds(m, 0) == (0.0, 0.0)
    assert fs.step_seconds(m, 3) == pytest.approx((0.5 + 1.0 + 1.5, 0.75))
    assert fs.step_seconds(m, 4) == pytest.approx((5.0, 1.0))
    with pytest.raises(RuntimeError, match="no step time"):
        fs.step_seconds(m, 5)


def test_at_time_takes_the_latest_stage_finished_within_the_time():
    curve = {0: {"seconds": [0.0], "top1": [50.0]}, 100: {"seconds": [30.0, 34.0], "top1": [60.0, 62.0]},
             300: {"seconds": [95.0], "top1": [66.0]}}
    assert fs.at_time(curve, 10.0) == (0, 50.0)
    assert fs.at_time(curve, 32.0) == (100, 61.0)       # the median of two seeds: 32 s
    assert fs.at_time(curve, 94.9) == (100, 61.0)
    assert fs.at_time(curve, 200.0) == (300, 66.0)
    assert fs.at_time({5: {"seconds": [3.0], "top1": [1.0]}}, 1.0) is None
    # the median over seeds: one seed slowed by other work (90 s) does not delay the stage
    assert fs.at_time({0: {"seconds": [0.0], "top1": [50.0]},
                       10: {"seconds": [20.0, 90.0, 21.0], "top1": [60.0, 61.0, 62.0]}}, 25.0) == (10, 61.0)


def _stage(root, run, step, seconds, top1):
    folder = root / run.name / f"step-{step}"
    folder.mkdir(parents=True)
    (folder / "stage.json").write_text(json.dumps({"step_cpu_seconds": seconds * 2, "step_wall_seconds": seconds,
                                                   "peak_rss_mib": 1000.0}))
    (folder / "eval.json").write_text(json.dumps({"top1_mean": top1 / 100, "top1_std": 0.01}))


def test_report_averages_seeds_and_compares_at_equal_time(tmp_path, monkeypatch):
    runs = [fs.Run(1, "clpdd-pixel", 0, (), (0, 100)), fs.Run(1, "clpdd-pixel", 1, (), (0, 100)),
            fs.Run(1, "lgm-k3-pixel", 0, (), (0, 20, 60)), fs.Run(1, "clpdd-pixel-mse", 0, (), (0, 100)),
            fs.Run(1, "clpdd-pixel-lr0.1", 0, (), (100,))]
    monkeypatch.setattr(fs, "RUNS", runs)
    monkeypatch.setattr(fs, "LITERAL", [])
    for r, pts in zip(runs, ([(0, 0, 50), (100, 20, 70)], [(0, 0, 52), (100, 22, 66)],
                             [(0, 0, 50), (20, 15, 55), (60, 45, 65)], [(0, 0, 50), (100, 30, 72)],
                             [(100, 20, 60)])):
        for step, sec, top1 in pts:
            _stage(tmp_path, r, step, sec, top1)
    md = tmp_path / "F.md"
    md.write_text("# F\n\nbefore\n<!-- fidelity schedule begin -->\nold\n<!-- fidelity schedule end -->\nafter\n")
    fs.report(tmp_path, md, tmp_path / "plot.png", "test machine")
    text = md.read_text()
    assert text.startswith("# F\n\nbefore\n") and text.endswith("after\n") and "\nold\n" not in text
    # CLP-DD at step 100: two seeds, 68 +- 2 %, 21 s of steps (wall) and 42 CPU seconds
    assert "| 1 | clpdd-pixel | 100 | 21 / 42 | 0,1 | 68.00 ± 2.00 | 70.00 / 66.00 |" in text
    # at 21 s LGM had finished its step-20 stage (15 s) but not step 60 (45 s): 68 - 55 = +13
    assert "| 1 | CLP-DD | 100 | 21 | clpdd-pixel | 100 | 68.00 | lgm-k3-pixel | 20 | 55.00 | +13.00 |" in text
    # at LGM's 15 s CLP-DD had only its step 0 (51 %); at LGM's 45 s it had step 100 (21 s)
    assert "| 1 | LGM | 20 | 15 | clpdd-pixel | 0 | 51.00 | lgm-k3-pixel | 20 | 55.00 | -4.00 |" in text
    assert "| 1 | LGM | 60 | 45 | clpdd-pixel | 100 | 68.00 | lgm-k3-pixel | 60 | 65.00 | +3.00 |" in text
    # the MSE row is compared too (at its 30 s LGM had step 20); a learning-rate probe is not
    assert "| 1 | CLP-DD | 100 | 30 | clpdd-pixel-mse | 100 | 72.00 | lgm-k3-pixel | 20 | 55.00 | +17.00 |" in text
    assert "| 1 | LGM | 60 | 45 | clpdd-pixel-mse | 100 | 72.00 | lgm-k3-pixel | 60 | 65.00 | +7.00 |" in text
    assert "| 1 | clpdd-pixel-lr0.1 | 100 |" in text and "| clpdd-pixel-lr0.1 | 100 | 60.00 | lgm" not in text
