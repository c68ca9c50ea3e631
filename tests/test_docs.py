"""The documentation stays true to the code: every flag it names exists, every relative link resolves.

Flags: each `--flag` that README.md or docs/*.md writes is looked up in the argparse parser of the tool it belongs
to (built by that tool's own `build_parser()`, so hidden aliases of renamed flags count). The tool is the one a
command names (`python -m clpdd_fast.evaluate --seeds 5`, or a code span starting `evaluate --seeds`); a flag
written alone belongs to the tool that the nearest enclosing heading names (`distill`, `evaluate` or `export`),
else to any of the three. Flags after another program (`benchmarks/...py`, `tools/...py`, `torchrun`, `nsys`,
`pip`, `pytest`, `make`) are that program's and are not checked.
Links: every relative link and image in README.md, docs/*.md and benchmarks/*.md points to an existing file, and an
`#anchor` to a heading of its target page.
"""
from __future__ import annotations

import importlib
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("distill", "evaluate", "export")
FLAG_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK_DOCS = [*FLAG_DOCS, *sorted((ROOT / "benchmarks").glob("*.md"))]
WRITTEN_DOCS = [*FLAG_DOCS, ROOT / "benchmarks" / "README.md"]   # the hand-written pages (FIDELITY/RESULTS: generated)

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_]*(?:-[a-z0-9_]+)*")
TOOL_MARK = re.compile(r"clpdd_fast\.(distill|evaluate|export)\b|^\s*(distill|evaluate|export)\b")
OTHER_MARK = re.compile(r"(?:\S*benchmarks/|\S*tools/)\S+\.(?:py|sh)\b|\b(?:torchrun|nsys|pip|pytest|make)\b")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")


@lru_cache(maxsize=None)
def options(tool: str) -> frozenset:
    """Every option string of the tool's parser (hidden ones included)."""
    parser = importlib.import_module(f"clpdd_fast.{tool}").build_parser()
    return frozenset(parser._option_string_actions)


def heading_tool(stack: list) -> str | None:
    """The tool named by the innermost heading in `stack` that names exactly one."""
    for _, text in reversed(stack):
        named = set(re.findall(r"\b(distill|evaluate|export)\b", text))
        if len(named) == 1:
            return named.pop()
    return None


def command_flags(code: str, default: str | None):
    """(flag, tool) for each flag in one command line or code span; tool None: any of the three; "other": skip."""
    marks = [(m.start(), m.group(1) or m.group(2)) for m in TOOL_MARK.finditer(code)]
    marks += [(m.start(), "other") for m in OTHER_MARK.finditer(code)]
    marks.sort()
    for m in FLAG.finditer(code):
        before = [tool for pos, tool in marks if pos < m.start()]
        yield m.group(0), (before[-1] if before else default)


def flag_mentions(path: Path):
    """(line number, flag, tool) for every flag the page writes, the tool as command_flags says."""
    stack, in_fence, pending, pending_line = [], False, "", 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:   # a command may continue over lines ending in a backslash
            pending, pending_line = pending + line.rstrip("\\") + " ", pending_line or number
            if line.rstrip().endswith("\\"):
                continue
            for flag, tool in command_flags(pending, heading_tool(stack)):
                yield pending_line, flag, tool
            pending, pending_line = "", 0
            continue
        heading = HEADING.match(line)
        if heading:
            level = len(heading.group(1))
            stack = [h for h in stack if h[0] < level] + [(level, heading.group(2))]
        default = heading_tool(stack)
        for span in CODE_SPAN.finditer(line):
            for flag, tool in command_flags(span.group(2), default):
                yield number, flag, tool
        for flag, tool in command_flags(CODE_SPAN.sub(" ", line), default):
            yield number, flag, tool


@pytest.mark.parametrize("path", FLAG_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_flag_the_docs_name_exists_in_its_tool(path):
    unknown = []
    for number, flag, tool in flag_mentions(path):
        if tool == "other":
            continue
        tools = TOOLS if tool is None else (tool,)
        if not any(flag in options(t) for t in tools):
            unknown.append(f"{path.relative_to(ROOT)}:{number}: {flag} ({' / '.join(tools)})")
    assert not unknown, "flags the docs name but the tools lack:\n" + "\n".join(unknown)


def test_the_flag_finder_attributes_flags_to_their_tools():
    line = "torchrun --nproc_per_node 8 -m clpdd_fast.distill --ipc 1  # then evaluate --seeds 5"
    assert list(command_flags(line, None)) == [("--nproc_per_node", "other"), ("--ipc", "distill"),
                                               ("--seeds", "distill")]
    assert list(command_flags("evaluate --aug-draws 0", "distill")) == [("--aug-draws", "evaluate")]
    assert list(command_flags("python3 benchmarks/bench_ops.py --quick", None)) == [("--quick", "other")]
    assert list(command_flags("--lam 1, not x--y", "distill")) == [("--lam", "distill")]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").replace("*", "").strip().lower()
    return re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", text))


def anchors(path: Path) -> set:
    seen, found, in_fence = {}, set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        heading = None if in_fence else HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path):
    """(line number, target) of every link and image outside code."""
    in_fence = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        text = CODE_SPAN.sub(" ", line)
        for m in (*LINK.finditer(text), *REF_LINK.finditer(text)):
            yield number, m.group(1)


@pytest.mark.parametrize("path", LINK_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_an_existing_file(path):
    broken = []
    for number, target in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{path.relative_to(ROOT)}:{number}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{path.relative_to(ROOT)}:{number}: {target} (no heading #{anchor} in {dest.name})")
        elif not str(dest).startswith(str(ROOT)):
            broken.append(f"{path.relative_to(ROOT)}:{number}: {target} (outside the repository)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) < 200, f"README.md has {len(lines)} lines: move reference material to docs/"


@pytest.mark.parametrize("path", WRITTEN_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_cite_no_machine_paths_and_keep_lines_short(path):
    text = path.read_text(encoding="utf-8")
    for local in ("../" + "shared", "/" + "work/"):
        assert local not in text, f"{path.relative_to(ROOT)} cites {local!r}, a path of one machine"
    long = [n for n, line in enumerate(text.splitlines(), 1) if len(line) > 120 and not line.startswith("|")]
    assert not long, f"{path.relative_to(ROOT)}: lines over 120 characters (tables excepted): {long}"
