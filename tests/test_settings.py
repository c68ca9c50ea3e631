"""clpdd_fast.settings: every variable read when used, its default when unset or empty, a bad value named."""
import os

import pytest

from clpdd_fast import settings

READERS = {"TRITON_INTERPRET": settings.triton_interpret, "CLPDD_AUTOTUNE": settings.autotune,
           "CLPDD_CE_PRECISION": settings.ce_precision, "CLPDD_RIDGE_PRECISION": settings.ridge_precision,
           "CLPDD_TRACEBACK": settings.show_traceback}
DEFAULTS = {"TRITON_INTERPRET": False, "CLPDD_AUTOTUNE": False, "CLPDD_CE_PRECISION": "highest",
            "CLPDD_RIDGE_PRECISION": "highest", "CLPDD_TRACEBACK": False}


def test_every_variable_has_one_reader():
    assert set(READERS) == set(settings.VALUES)


@pytest.mark.parametrize("name", list(READERS))
def test_a_setting_is_read_when_used_with_its_default_when_unset_and_a_bad_value_named(name, monkeypatch):
    read = READERS[name]
    monkeypatch.delenv(name, raising=False)
    assert read() == DEFAULTS[name]
    monkeypatch.setenv(name, "")
    assert read() == DEFAULTS[name]
    seen = []
    for value in settings.VALUES[name]:
        monkeypatch.setenv(name, value)
        seen.append(read())
    assert seen[0] == DEFAULTS[name] and len(set(seen)) == len(seen)
    monkeypatch.setenv(name, "yes")
    with pytest.raises(ValueError, match=f"^{name}: expected '.+' or '.+', got 'yes'$"):
        read()


def test_overridden_sets_the_variable_for_the_block_and_restores_it(monkeypatch):
    monkeypatch.delenv("CLPDD_CE_PRECISION", raising=False)
    with settings.overridden("CLPDD_CE_PRECISION", "medium"):
        assert settings.ce_precision() == "medium"
    assert "CLPDD_CE_PRECISION" not in os.environ
    monkeypatch.setenv("CLPDD_CE_PRECISION", "high")
    with pytest.raises(ValueError, match="^CLPDD_CE_PRECISION: expected"):
        with settings.overridden("CLPDD_CE_PRECISION", "fast"):
            pass
    assert os.environ["CLPDD_CE_PRECISION"] == "high"


@pytest.mark.parametrize("name", sorted(settings.RENAMED))
def test_the_old_precision_words_read_as_the_new_ones_with_a_note(name, monkeypatch):
    for old, new in settings.RENAMED[name].items():
        assert new in settings.VALUES[name]
        monkeypatch.setenv(name, old)
        with pytest.warns(FutureWarning, match=f"^{name}: '{old}' is now called '{new}'"):
            assert READERS[name]() == new
