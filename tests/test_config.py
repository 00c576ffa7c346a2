"""The config tree: documentation of every option, overrides, errors, generated files in sync."""
from pathlib import Path

import pytest
import yaml

from snakedrp import config as sdconfig
from snakedrp.__main__ import main
from snakedrp.pexconfig import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_every_option_has_a_description():
    rows = sdconfig.PipelineConfig.describe()
    assert len(rows) > 50
    undocumented = [r["name"] for r in rows if len(r["doc"].strip()) < 8]
    assert undocumented == []


def test_show_config_lists_every_option(capsys):
    assert main(["show-config", "--base", str(ROOT / "config/config.yaml")]) == 0
    out = capsys.readouterr().out
    for row in sdconfig.PipelineConfig.describe():
        assert f"\n{row['name']}: " in "\n" + out, row["name"]
    assert "[from default]" in out


def test_show_config_reports_origin_and_pattern(tmp_path, capsys):
    partial = tmp_path / "my.yaml"
    partial.write_text("isr:\n  do_dark: false\n")
    argv = ["show-config", "isr.*", "--base", str(ROOT / "config/config.yaml"),
            "--configfile", str(partial), "--config", "isr.do_flat=false"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert all(line.startswith(("#", "isr.")) for line in lines)
    flat = lines.index("isr.do_flat: false")
    assert "[from command line]" in lines[flat - 1]
    dark = lines.index("isr.do_dark: false")
    assert f"[from --configfile {partial}]" in lines[dark - 1]


def test_dotted_and_nested_overrides_merge():
    cfg, origin = sdconfig.resolve([
        ("base", {"isr": {"do_flat": True, "do_dark": True}}),
        ("file", {"isr": {"do_dark": False}}),
        ("cli", {"isr.do_flat": False, "calibrate.astrometry.sip_order": 2}),
    ])
    assert cfg.isr.do_flat is False and cfg.isr.do_dark is False
    assert cfg.calibrate.astrometry.sip_order == 2
    assert origin["isr.do_flat"] == "cli" and origin["isr.do_dark"] == "file"
    assert origin["isr.do_bias"] == "default"


@pytest.mark.parametrize("values, words", [
    ({"isr.do_flatt": False}, ["do_flatt", "do_flat"]),
    ({"isr": {"do_flat": "maybe"}}, ["isr.do_flat", "bool"]),
    ({"calibrate.astrometry.sip_order": 99}, ["sip_order", "outside"]),
    ({"nosuchsection": {"x": 1}}, ["nosuchsection", "allowed"]),
    ({"characterize.first_background_subsample": 3}, ["first_background_subsample", "box_size"]),
])
def test_bad_options_are_named(values, words):
    with pytest.raises(ConfigError) as err:
        sdconfig.resolve([("cli", values)])
    for word in words:
        assert word in str(err.value)


def test_cli_bad_option_exits_2(capsys):
    assert main(["show-config", "--base", str(ROOT / "config/config.yaml"), "--config", "isr.do_flat=3"]) == 2
    assert "isr.do_flat" in capsys.readouterr().err


def test_generated_config_files_are_in_sync():
    assert (ROOT / "config/config.yaml").read_text() == sdconfig.default_config_yaml(), \
        "run: python -m snakedrp write-config"
    assert yaml.safe_load((ROOT / "config/schema.yaml").read_text()) == yaml.safe_load(sdconfig.schema_yaml())


def test_schema_accepts_defaults_and_rejects_bad_types():
    import jsonschema
    schema = yaml.safe_load((ROOT / "config/schema.yaml").read_text())
    jsonschema.validate(sdconfig.PipelineConfig().to_dict(), schema)
    bad = sdconfig.PipelineConfig().to_dict()
    bad["isr"]["do_flat"] = "no"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_rerun_config_mismatch_is_refused(tmp_path):
    cfg, _ = sdconfig.resolve([])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert sdconfig.check_rerun_config(path, cfg, clobber=False) == []
    changed, _ = sdconfig.resolve([("cli", {"isr.do_flat": False})])
    with pytest.raises(ConfigError, match="isr.do_flat"):
        sdconfig.check_rerun_config(path, changed, clobber=False)
    assert sdconfig.check_rerun_config(path, changed, clobber=True) == ["isr.do_flat"]
