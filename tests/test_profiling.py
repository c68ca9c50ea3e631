"""NVTX ranges: a no-op when disabled or unavailable, balanced push/pop when enabled, never an exception."""
import pytest

from clpdd_fast import profiling


class FakeNvtx:
    def __init__(self, fail_push=False, fail_pop=False):
        self.events, self.depth, self.max_depth = [], 0, 0
        self.fail_push, self.fail_pop = fail_push, fail_pop

    def push(self, name):
        if self.fail_push:
            raise RuntimeError("no NVTX")
        self.depth += 1
        self.max_depth = max(self.max_depth, self.depth)
        self.events.append(("push", name))

    def pop(self):
        if self.fail_pop:
            raise RuntimeError("no NVTX")
        self.depth -= 1
        self.events.append(("pop",))


@pytest.fixture
def fake(monkeypatch):
    f = FakeNvtx()
    monkeypatch.setattr(profiling, "_backend", (f.push, f.pop))
    monkeypatch.setattr(profiling, "_enabled", False)
    return f


def test_disabled_is_a_noop(fake):
    with profiling.nvtx_range("decode"):
        with profiling.nvtx_range("inner"):
            pass
    assert fake.events == [] and not profiling.is_enabled()


def test_enabled_nested_ranges_balance(fake):
    assert profiling.set_enabled(True) is True
    with profiling.nvtx_range("step"):
        with profiling.nvtx_range("decode"):
            pass
        with profiling.nvtx_range("encoder_forward"):
            pass
    assert fake.events == [("push", "step"), ("push", "decode"), ("pop",), ("push", "encoder_forward"), ("pop",),
                           ("pop",)]
    assert fake.depth == 0 and fake.max_depth == 2
    profiling.set_enabled(False)
    with profiling.nvtx_range("after"):
        pass
    assert len(fake.events) == 6


def test_range_pops_on_exception(fake):
    profiling.set_enabled(True)
    with pytest.raises(KeyError):
        with profiling.nvtx_range("outer"):
            raise KeyError("boom")
    assert fake.depth == 0
    profiling.set_enabled(False)


def test_backend_failures_never_raise(monkeypatch):
    f = FakeNvtx(fail_push=True)
    monkeypatch.setattr(profiling, "_backend", (f.push, f.pop))
    monkeypatch.setattr(profiling, "_enabled", True)
    with profiling.nvtx_range("x"):
        pass
    g = FakeNvtx(fail_pop=True)
    monkeypatch.setattr(profiling, "_backend", (g.push, g.pop))
    with profiling.nvtx_range("y"):
        pass
    assert g.events == [("push", "y")]


def test_no_backend_warns_and_stays_noop(monkeypatch):
    monkeypatch.setattr(profiling, "_backend", None)
    monkeypatch.setattr(profiling, "_enabled", False)
    monkeypatch.setattr(profiling, "_resolve_backend", lambda: False)
    with pytest.warns(RuntimeWarning, match="NVTX"):
        assert profiling.set_enabled(True) is False
    assert not profiling.is_enabled()
    with profiling.nvtx_range("z"):
        pass
    profiling.set_enabled(False)


def test_real_backend_without_cuda_does_not_crash(monkeypatch):
    # whatever this machine has (the nvtx package, or nothing without CUDA), entering ranges must work
    monkeypatch.setattr(profiling, "_backend", None)
    monkeypatch.setattr(profiling, "_enabled", False)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        profiling.set_enabled(True)
    with profiling.nvtx_range("a"):
        with profiling.nvtx_range("b"):
            pass
    profiling.set_enabled(False)


def test_annotate_decorator(fake):
    @profiling.annotate()
    def work(x):
        return x + 1

    profiling.set_enabled(True)
    assert work(1) == 2
    profiling.set_enabled(False)
    assert fake.events[0][1].endswith("work") and fake.events[-1] == ("pop",)
