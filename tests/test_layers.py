"""The package's floors, read from the source: the kernels are the ground floor (they import nothing of clpdd_fast
above clpdd_fast.kernels and read no environment variable), and no module imports itself through a circle."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# where each importable name lives: the installed package maps kernels/ to clpdd_fast.kernels (setup.py)
PACKAGES = {"clpdd_fast": ROOT / "clpdd_fast", "clpdd_fast.kernels": ROOT / "kernels", "tools": ROOT / "tools"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    for path in sorted((ROOT / "benchmarks").glob("*.py")):   # scripts: they import each other by bare name
        found[f"benchmarks.{path.stem}"] = path
    return found


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of this repository that `name` imports (at any depth of its code), as dotted names."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if name.startswith("benchmarks.") and f"benchmarks.{target}" in known:
                target = f"benchmarks.{target}"
            if target in known and target != name:
                out.add(target)
    return out


def test_the_kernels_import_nothing_above_them_and_read_no_environment():
    known = _modules()
    for name, path in known.items():
        if not name.startswith("clpdd_fast.kernels"):
            continue
        above = {m for m in _imports(name, path, known) if not m.startswith("clpdd_fast.kernels")}
        assert not above, f"{path.relative_to(ROOT)} imports {sorted(above)}: the kernels are the ground floor"
        for node in ast.walk(ast.parse(path.read_text())):
            word = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            assert word not in ("environ", "getenv", "putenv"), \
                f"{path.relative_to(ROOT)} reads the environment ({word}): settings arrive as arguments"


def test_the_rule_sees_a_violation(tmp_path):
    """The reading above resolves relative and absolute imports alike (a reading of only one kind would let the
    other kind through)."""
    known = _modules()
    for i, source in enumerate(("from clpdd_fast import settings\n", "from .. import settings\n",
                                "import clpdd_fast.reference as r\n", "from ..reference import compute_dtype\n")):
        probe = tmp_path / f"probe{i}.py"
        probe.write_text(source)
        assert _imports("clpdd_fast.kernels.probe", probe, known) & {"clpdd_fast.settings", "clpdd_fast.reference"}


def test_no_module_imports_itself_through_a_circle():
    known = _modules()
    graph = {name: _imports(name, path, known) for name, path in known.items()}
    # a package's __init__ and its own modules are one unit (importing clpdd_fast.x runs clpdd_fast/__init__)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt == node.rpartition(".")[0] or node == nxt.rpartition(".")[0]:
                continue
            if state.get(nxt) == 1:
                circle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                pytest.fail("import circle: " + " -> ".join(circle))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
