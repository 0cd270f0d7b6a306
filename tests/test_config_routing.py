"""Configuration loading/validation and route matching."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import Route, load_config
from node.config_template import render_template
from node.errors import ConfigError
from node.schedule.routing import match_route, matching_routes, validate_route


def test_template_is_valid(tmp_path: Path) -> None:
    p = tmp_path / "node.toml"
    p.write_text(render_template())
    cfg = load_config(p, env={})
    assert cfg.node.ae_title == "PREANNOT"
    assert cfg.routes[0].models == ["lesion-ct-demo"]
    assert cfg.destination("pacs").port == 4242


def test_env_values_are_parsed_by_the_key_type() -> None:
    cfg = load_config(None, env={"PREANNOT_NODE__AE_TITLE": "1234", "PREANNOT_JOBS__WORKERS": "3",
                                 "PREANNOT_WEB__TOKENS": '{"ris": "0123456789abcdef"}', "PREANNOT_CONFIG": "x.toml"})
    assert cfg.node.ae_title == "1234" and isinstance(cfg.node.ae_title, str)  # digits stay an AE title
    assert cfg.jobs.workers == 3
    assert cfg.web.tokens == {"ris": "0123456789abcdef"}
    with pytest.raises(ConfigError, match="port"):
        load_config(None, env={"PREANNOT_NODE__PORT": "eleven"})


def test_relative_paths_resolve_against_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "etc"
    conf.mkdir()
    (conf / "node.toml").write_text('[node]\ndata_dir = "data"\n[models]\ndir = "../bundles"\n')
    monkeypatch.chdir("/")
    cfg = load_config(conf / "node.toml", env={})
    assert cfg.node.data_dir == conf / "data"
    assert cfg.models.dir == tmp_path / "bundles"
    assert load_config(None, env={}).models.dir == Path("models")  # no file: as given


def test_config_init_output_creates_its_folder(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from node.cli import app

    target = tmp_path / "etc" / "preannot" / "node.toml"
    r = CliRunner().invoke(app, ["config", "init", "--output", str(target)])
    assert r.exit_code == 0 and target.is_file()
    assert load_config(target, env={}).models.dir.is_absolute()
    assert CliRunner().invoke(app, ["config", "init", "--output", str(target)]).exit_code == 1  # no overwrite


def test_defaults_without_file() -> None:
    cfg = load_config(None, env={})
    assert cfg.node.port == 11112
    assert cfg.node.stable_seconds == 10
    assert cfg.node.allowed_callers == []  # nobody is allowed until configured


def test_env_overrides_file(tmp_path: Path) -> None:
    p = tmp_path / "node.toml"
    p.write_text(render_template())
    cfg = load_config(p, env={"PREANNOT_NODE__PORT": "11999", "PREANNOT_NODE__ALLOWED_CALLERS": '["A", "B"]',
                              "PREANNOT_WEB__TOKENS": '{"ops": "s3cret-s3cret-s3cret"}'})
    assert cfg.node.port == 11999
    assert cfg.node.allowed_callers == ["A", "B"]
    assert cfg.web.tokens == {"ops": "s3cret-s3cret-s3cret"}


@pytest.mark.parametrize(("toml", "needle"), [
    ('[node]\nport = "abc"', "node.port"),
    ('[node]\nport = 70000', "node.port"),
    ('[node]\nae_title = "THIS_AE_TITLE_IS_TOO_LONG"', "THIS_AE_TITLE_IS_TOO_LONG"),
    ('[node]\nunknown_key = 1', "unknown_key"),
    ('[node]\nlate_instances = "sometimes"', "late_instances"),
    ('[[routes]]\nname = "r"\nmodels = ["m"]\nsend_to = ["nowhere"]', "nowhere"),
    ('[[routes]]\nname = "r"\nmodels = []', "routes.0.models"),
    ('[outputs]\nuid_root = "1.2.abc."', "uid_root"),
    ("this is not toml", "not valid TOML"),
])
def test_errors_name_key_and_value(tmp_path: Path, toml: str, needle: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(p, env={})
    assert needle in str(info.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/node.toml", env={})


def test_config_version_changes_with_content() -> None:
    a = load_config(None, env={})
    b = load_config(None, env={"PREANNOT_NODE__PORT": "4000"})
    assert a.version() != b.version()


CT = {"Modality": "CT", "BodyPartExamined": "CHEST", "SliceThickness": "2.5",
      "SeriesDescription": "Thorax AX 2.5 mm", "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}


@pytest.mark.parametrize(("match", "expected"), [
    ({"Modality": "CT"}, True),
    ({"Modality": "ct"}, True),
    ({"Modality": "MR"}, False),
    ({"BodyPartExamined": ["THORAX", "CHEST"]}, True),
    ({"BodyPartExamined": ["ABDOMEN"]}, False),
    ({"SliceThickness": "<=2.5"}, True),
    ({"SliceThickness": "<2.5"}, False),
    ({"SliceThickness": "1..3"}, True),
    ({"SliceThickness": 2.5}, True),
    ({"SeriesDescription": "re:^thorax"}, True),
    ({"SeriesDescription": "re:lung"}, False),
    ({"ImageType": "contains:AXIAL"}, True),
    ({"ImageType": "contains:LOCALIZER"}, False),
    ({"ContrastBolusAgent": "*"}, False),
    ({"ContrastBolusAgent": "!"}, True),
    ({"Modality": "CT", "SliceThickness": ">5"}, False),
])
def test_match_conditions(match: dict, expected: bool) -> None:
    route = Route(name="r", match=match, models=["m"])
    assert match_route(route, CT) is expected


def test_ae_title_conditions() -> None:
    r = Route(name="r", match={"Modality": "CT"}, called_ae=["PREANNOT_CT"], calling_ae=["ORTHANC"], models=["m"])
    assert match_route(r, CT, called_ae="PREANNOT_CT", calling_ae="ORTHANC")
    assert not match_route(r, CT, called_ae="PREANNOT", calling_ae="ORTHANC")
    assert not match_route(r, CT, called_ae="PREANNOT_CT", calling_ae="OTHER")


def test_matching_routes_order_and_validation() -> None:
    r1 = Route(name="a", match={"Modality": "CT"}, models=["m1"])
    r2 = Route(name="b", match={"Modality": "MR"}, models=["m2"])
    r3 = Route(name="c", match={}, models=["m3"])
    assert [r.name for r in matching_routes([r1, r2, r3], CT)] == ["a", "c"]
    with pytest.raises(ConfigError, match="bad regular expression"):
        validate_route(Route(name="x", match={"SeriesDescription": "re:(unclosed"}, models=["m"]))
    with pytest.raises(ConfigError, match="not a DICOM keyword"):
        validate_route(Route(name="x", match={"0008,0060": "CT"}, models=["m"]))
