"""The README's code example runs as written and computes what it says."""
import re
from pathlib import Path

import torch


def test_readme_ops_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## The ops in your own code\n\n```python\n(.*?)```", text, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["K"].shape == (100, 100) and scope["W"].shape == (768, 10)
    assert torch.isfinite(scope["loss"]) and torch.isfinite(scope["loss_mse"])
    assert scope["phi_s"].grad is not None and torch.isfinite(scope["phi_s"].grad).all()


def test_readme_compiled_example_runs_after_the_ops_example():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    first = re.search(r"## The ops in your own code\n\n```python\n(.*?)```", text, re.S).group(1)
    compiled = re.search(r"```python\n(step = torch.compile.*?)```", text, re.S).group(1)
    scope = {}
    exec(compile(first, "README.md", "exec"), scope)
    scope["phi_s"].grad = None
    torch._dynamo.reset()
    exec(compile(compiled, "README.md", "exec"), scope)
    assert scope["phi_s"].grad is not None and torch.isfinite(scope["phi_s"].grad).all()
