"""What the CLIs share: --device checked against the machine, bad input ends in one error line and status 2."""
import argparse

import pytest
import torch

from clpdd_fast.cli import device_arg, run_main


@pytest.mark.parametrize("stop,status", [(SystemExit("error: --resume: no checkpoint.pt in x"), 2),
                                         (ValueError("lam: expected a finite number > 0"), 2),
                                         (SystemExit(130), 130), (SystemExit(0), 0)])
def test_run_main_ends_bad_input_with_status_2_and_one_line(capsys, stop, status):
    def failing():
        raise stop
    with pytest.raises(SystemExit) as exit_info:
        run_main(failing)
    assert exit_info.value.code == status
    err = capsys.readouterr().err
    assert err.count("error:") == (1 if status == 2 else 0) and "Traceback" not in err


def test_traceback_setting_keeps_the_traceback_and_a_bad_value_is_an_error_line(monkeypatch, capsys):
    def failing():
        raise ValueError("lam: expected a finite number > 0")
    monkeypatch.setenv("CLPDD_TRACEBACK", "1")
    with pytest.raises(ValueError, match="lam"):
        run_main(failing)
    monkeypatch.setenv("CLPDD_TRACEBACK", "yes")
    with pytest.raises(SystemExit) as exit_info:
        run_main(failing)
    assert exit_info.value.code == 2 and "error: CLPDD_TRACEBACK: expected '0' or '1', got 'yes'" in capsys.readouterr().err


def test_device_index_is_checked_against_the_gpus_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_arg("cuda") == "cuda" and device_arg("cuda:1") == "cuda:1" and device_arg("cpu") == "cpu"
    with pytest.raises(argparse.ArgumentTypeError, match=r"has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        device_arg("cuda:2")
