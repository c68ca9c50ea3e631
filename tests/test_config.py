"""RunConfig: the one source of distill's defaults, old saved configs load, --resume compares the right settings."""
import dataclasses

import pytest

from clpdd_fast.config import DERIVED, RESUMABLE, RunConfig
from clpdd_fast.distill import build_parser


def test_the_parser_sets_every_command_line_setting_with_its_default():
    parser = build_parser()
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    assert dests == fields - DERIVED
    assert RESUMABLE <= dests
    assert RunConfig(**vars(parser.parse_args([]))) == RunConfig()


def test_an_old_config_without_newer_settings_loads_with_their_defaults():
    old = {"method": "clpdd", "ipc": 3, "lam": 0.5, "model": "m", "image_size": 32, "num_classes": 4}
    cfg = RunConfig.from_dict(old)
    assert (cfg.ipc, cfg.lam, cfg.model, cfg.image_size, cfg.num_classes) == (3, 0.5, "m", 32, 4)
    assert cfg.skip_bad_images is False and cfg.world_size is None and cfg.tau == RunConfig().tau
    assert RunConfig.from_dict(cfg.to_dict()) == cfg   # round trip through the saved dict


def test_unknown_settings_are_named_and_left_out(capsys):
    cfg = RunConfig.from_dict({"ipc": 2, "retired_flag": 1}, "config.json")
    assert cfg.ipc == 2 and not hasattr(cfg, "retired_flag")
    err = capsys.readouterr().err
    assert "config.json" in err and "retired_flag" in err
    with pytest.raises(TypeError, match="my.pt: expected a dict"):
        RunConfig.from_dict(["ipc"], "my.pt")


def test_mismatches_name_command_line_settings_only():
    saved = RunConfig(lam=0.1, iterations=5, num_classes=10)
    assert saved.mismatches(RunConfig(lam=0.1, iterations=50, out="x", num_classes=None)) == []
    assert saved.mismatches(RunConfig(lam=2.0, skip_bad_images=True)) == ["--lam was 0.1, now 2.0"]


def test_a_preset_changes_its_settings_and_flags_given_still_win():
    from clpdd_fast.config import PRESETS
    from clpdd_fast.distill import parse
    for name, settings in PRESETS.items():
        assert settings and set(settings) <= {f.name for f in dataclasses.fields(RunConfig)} - DERIVED - {"preset"}
        cfg = parse(["--preset", name])
        assert cfg.preset == name
        assert {k: getattr(cfg, k) for k in settings} == settings
        assert all(getattr(RunConfig(), k) != v for k, v in settings.items())  # each one changes something
        # the other settings keep their defaults
        others = {f.name for f in dataclasses.fields(RunConfig)} - set(settings) - {"preset"}
        assert all(getattr(cfg, k) == getattr(RunConfig(), k) for k in others)
        # a flag given on the command line wins over the preset, before or after it
        assert parse(["--iterations", "7", "--preset", name]).iterations == 7
        assert parse(["--preset", name, "--iterations", "7"]).iterations == 7
    assert parse([]) == RunConfig()
    with pytest.raises(SystemExit):
        parse(["--preset", "nonexistent"])
    # a resumed run must name the same preset: it is a command-line setting, not a resumable one
    assert RunConfig(preset="quality").mismatches(RunConfig()) == ["--preset was 'quality', now None"]


def test_files_with_old_setting_names_load_under_the_new_names(capsys):
    cfg = RunConfig.from_dict({"precision": "bf16", "chunk_size": 8, "ipc": 2}, "old.pt")
    assert (cfg.encoder_dtype, cfg.encoder_batch, cfg.ipc) == ("bf16", 8, 2)
    err = capsys.readouterr().err
    assert "note: old.pt:" in err and "precision as encoder_dtype" in err and "chunk_size as encoder_batch" in err
    assert "unknown" not in err   # a note, not the warning about settings this version does not know
    assert RunConfig.from_dict({"chunk_size": 8, "encoder_batch": 16}).encoder_batch == 16   # the new name wins
    capsys.readouterr()
    RunConfig.from_dict(cfg.to_dict())
    assert "note" not in capsys.readouterr().err   # files written now: no note


def test_old_flags_keep_working_with_a_note_naming_the_new_flag(capsys):
    from clpdd_fast.distill import parse
    cfg = parse(["--chunk-size", "8", "--precision", "bf16", "--preset", "quality"])   # a preset parses twice
    assert (cfg.encoder_batch, cfg.encoder_dtype) == (8, "bf16")
    err = capsys.readouterr().err
    assert err.count("note: --chunk-size is now --encoder-batch") == 1
    assert err.count("note: --precision is now --encoder-dtype") == 1
    new = parse(["--encoder-batch", "8", "--encoder-dtype", "bf16"])
    assert new == RunConfig(encoder_batch=8, encoder_dtype="bf16")
    assert "note" not in capsys.readouterr().err
    text = build_parser().format_help()
    assert "--encoder-batch" in text and "--chunk-size" not in text and "--precision" not in text
    with pytest.raises(SystemExit):   # the old spelling checks its value as the new one does, naming itself
        parse(["--precision", "fp16"])
    assert "argument --precision: invalid choice: 'fp16'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--chunk-size", "0"])
    assert "argument --chunk-size: expected an integer >= 1" in capsys.readouterr().err
