"""The progress display without tqdm: plain lines on stderr, counting from where resumed work starts."""
import builtins
import sys

from clpdd_fast.progress import Progress


def test_plain_lines_without_tqdm(monkeypatch, capsys):
    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name == "tqdm":
            raise ImportError("no tqdm here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    bar = Progress(10, "extracting", initial=4, unit="rows")
    bar.update(3)   # within 2 s of the start and not done: no line yet
    bar.update(3)   # done: a line
    bar.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("extracting: 10/10 rows (")
    hidden = Progress(5, "x", enabled=False)
    hidden.update(5)
    hidden.close()
    assert capsys.readouterr().err == ""
