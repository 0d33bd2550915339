"""Rules: the config's errors, matching, the model card's intended use, the dry run."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pydicom
import pytest
from click.testing import CliRunner
from pydicom.dataset import Dataset

from denoised_node.config.settings import ConfigError, Settings, load_settings
from denoised_node.daemon.cli.main import main
from denoised_node.daemon.jobs.intended_use import outside_intended_use, series_contrast
from denoised_node.daemon.jobs.rules import NO_RULE_MATCHES, decide, first_match
from denoised_node.daemon.jobs.series_attributes import SeriesAttributes, attributes_from_mapping
from denoised_node.model.card import read_card

T1 = {"Modality": "MR", "SeriesDescription": "AX T1 POST", "BodyPartExamined": "BRAIN",
      "SliceThickness": "3.0", "MagneticFieldStrength": "3", "MRAcquisitionType": "2D"}
SHIPPED_USE = read_card("default").intended_use


def _settings(**data: Any) -> Settings:
    base: dict[str, Any] = {"destinations": [
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242},
        {"name": "test-pacs", "ae_title": "TESTPACS", "host": "127.0.0.1", "port": 4243,
         "shadow": True}]}
    return Settings.model_validate({**base, **data})


def _facts(calling_ae: str = "", **values: Any) -> SeriesAttributes:
    return attributes_from_mapping("1.2.3", {**T1, **values}, calling_ae)


def _no_use(_checkpoint: str) -> dict[str, Any]:
    return {}


# -- the config --------------------------------------------------------------------------
@pytest.mark.parametrize(("rules", "message"), [
    ([{"name": "a", "match": {"SeriesDescriptio": "t1"}}], "did you mean SeriesDescription"),
    ([{"name": "a", "match": {"SeriesDescription": "(t1"}}], "is not a regular expression"),
    ([{"name": "a", "match": {"SliceThickness": [5, 1]}}], "low end is above its high end"),
    ([{"name": "a", "destinations": ["nowhere"]}], "'nowhere' that no [[destinations]]"),
    ([{"name": "a", "model": "knee"}], "model 'knee' is not \"default\", a [models] name"),
    ([{"name": "a"}, {"name": "a"}], "rule names must be unique: a"),
    ([{"name": "a", "review": "yes"}], "must be true or false"),
    ([{"name": "a", "destination": ["pacs"]}], "unknown key 'rules.0.destination'"),
])
def test_bad_rules_are_refused_with_the_key(tmp_path: Path, rules: list[dict[str, Any]],
                                            message: str) -> None:
    config = tmp_path / "node.toml"
    config.write_text("")
    with pytest.raises(ConfigError) as error:
        load_settings(config, environ={"DENOISED_NODE_RULES": json.dumps(rules)})
    assert message in str(error.value)


def test_rules_from_toml_keep_the_contract(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('''
[models]
knee = "/opt/models/knee.safetensors"

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 4242

[[destinations]]
name = "test-pacs"
ae_title = "TESTPACS"
host = "testpacs.hospital.example"
port = 104
shadow = true

[[rules]]
name = "brain-t1"
match = { Modality = "MR", SeriesDescription = "(?i)\\\\bt1\\\\b" }
model = "default"
destinations = ["pacs"]
review = false

[[rules]]
name = "knee"
match = { BodyPartExamined = "KNEE", SliceThickness = [1, 4] }
model = "knee"
destinations = ["test-pacs"]
review = true
''')
    settings = load_settings(config, environ={})
    brain, knee = settings.rules
    assert brain.match == {"Modality": "MR", "SeriesDescription": "(?i)\\bt1\\b"}
    assert knee.match["SliceThickness"] == (1.0, 4.0) and knee.review
    assert settings.checkpoint_for("knee") == "/opt/models/knee.safetensors"
    assert [d.name for d in settings.rule_destinations(knee)] == ["test-pacs"]


# -- matching ----------------------------------------------------------------------------
def test_without_rules_the_default_rule_keeps_todays_behaviour() -> None:
    settings = _settings()
    decision = decide(settings, _facts(), _no_use)
    assert decision.rule is not None and decision.rule.name == "default"
    assert decision.checkpoint == "default" and decision.destinations == ("pacs",)
    assert not decide(settings, _facts(Modality="CT"), _no_use).denoise


def test_first_matching_rule_decides_in_order() -> None:
    settings = _settings(rules=[
        {"name": "skip-scouts", "match": {"SeriesDescription": "(?i)scout"}, "ignore": True},
        {"name": "t1", "match": {"SeriesDescription": r"(?i)\bt1\b"}, "destinations": ["pacs"]},
        {"name": "anything", "destinations": ["test-pacs"]}])
    assert decide(settings, _facts(), _no_use).rule.name == "t1"  # type: ignore[union-attr]
    scout = decide(settings, _facts(SeriesDescription="T1 scout"), _no_use)
    assert scout.ignored_reason == "ignored by rule 'skip-scouts'"
    other = decide(settings, _facts(SeriesDescription="T2 COR"), _no_use)
    assert other.rule.name == "anything" and other.destinations == ("test-pacs",)  # type: ignore[union-attr]


def test_no_rule_matching_says_so_and_why() -> None:
    settings = _settings(rules=[{"name": "t2", "match": {"SeriesDescription": "T2"}}])
    decision = decide(settings, _facts(), _no_use)
    assert not decision.denoise and NO_RULE_MATCHES in str(decision.ignored_reason)
    assert "t2: SeriesDescription='AX T1 POST'" in decision.why


@pytest.mark.parametrize(("match", "expected"), [
    ({"SliceThickness": [2.5, 3.5]}, True),
    ({"SliceThickness": [3.5, 6]}, False),
    ({"MagneticFieldStrength": 3}, True),
    ({"MagneticFieldStrength": 1.5}, False),
    ({"BodyPartExamined": "^(BRAIN|HEAD)$"}, True),
    ({"Manufacturer": "SIEMENS"}, False),  # absent: reads as ""
    ({"ImageType": r"\\M\\"}, True),  # multi-valued: joined with backslashes
    ({"CallingAETitle": "^SCANNER1$"}, True),
    ({"SliceThickness": [0, 10], "CallingAETitle": "OTHER"}, False),
])
def test_match_entries(match: dict[str, Any], expected: bool) -> None:
    settings = _settings(rules=[{"name": "r", "match": match}])
    facts = _facts(calling_ae="SCANNER1", ImageType=["ORIGINAL", "PRIMARY", "M", "ND"])
    rule, _why = first_match(settings.rules, facts)
    assert (rule is not None) is expected


def test_enhanced_attributes_are_read_from_the_functional_groups() -> None:
    dataset = Dataset()
    dataset.Modality = "MR"
    measures = Dataset()
    measures.SliceThickness = "4.5"
    group = Dataset()
    group.PixelMeasuresSequence = [measures]
    dataset.SharedFunctionalGroupsSequence = [group]
    facts = SeriesAttributes("1.2", dataset)
    assert facts.number("SliceThickness") == 4.5


# -- the model card's intended use --------------------------------------------------------
@pytest.mark.parametrize(("values", "refusal"), [
    ({}, None),
    ({"BodyPartExamined": "KNEE"}, "BodyPartExamined KNEE is outside"),
    ({"BodyPartExamined": ""}, None),  # not said: not refused
    ({"SeriesDescription": "ep2d_diff_trace"}, "contrast DWI is outside"),
    ({"SeriesDescription": "AX FLAIR"}, "contrast FLAIR is outside"),
    ({"SeriesDescription": "COR T2 TSE"}, None),
    ({"SeriesDescription": "SAG 3D"}, None),  # no contrast word: not refused
    ({"SliceThickness": "6.0"}, "SliceThickness 6 mm is outside"),
    ({"SliceThickness": "0.6"}, "SliceThickness 0.6 mm is outside"),
    ({"MagneticFieldStrength": "15000"}, None),  # gauss, 1.5 T: not restricted
])
def test_shipped_model_intended_use(values: dict[str, Any], refusal: str | None) -> None:
    reason = outside_intended_use(_facts(**values), SHIPPED_USE)
    assert reason is None if refusal is None else refusal in str(reason)


def test_field_strength_limits_read_gauss_as_tesla() -> None:
    use = {"field_strength_t": [1.0, 3.0]}
    assert outside_intended_use(_facts(MagneticFieldStrength="15000"), use) is None
    assert "7 T is outside" in str(outside_intended_use(_facts(MagneticFieldStrength="7"), use))


def test_contrast_words() -> None:
    assert series_contrast(_facts(SeriesDescription="t1_mprage_sag")) == "T1"
    assert series_contrast(_facts(SeriesDescription="T2 FLAIR AX")) == "FLAIR"
    assert series_contrast(_facts(SeriesDescription="Localizer")) is None


def test_a_rule_overrides_the_intended_use_by_name() -> None:
    def shipped(_checkpoint: str) -> dict[str, Any]:
        return SHIPPED_USE

    knee = _facts(BodyPartExamined="KNEE", SeriesDescription="PD SAG")
    plain = decide(_settings(), knee, shipped)
    assert not plain.denoise and "override_intended_use = true" in str(plain.ignored_reason)
    override = _settings(rules=[{"name": "knee-trial", "override_intended_use": True,
                                 "destinations": ["test-pacs"]}])
    decision = decide(override, knee, shipped)
    assert decision.denoise and decision.destinations == ("test-pacs",)


# -- the dry run ---------------------------------------------------------------------------
def test_rules_test_prints_each_series_of_a_folder(tmp_path: Path, mr_series_factory) -> None:  # type: ignore[no-untyped-def]
    t1 = mr_series_factory(slices=2, series_description="T1 AX", seed=1)
    dwi = mr_series_factory(slices=2, series_description="DWI b1000", seed=2)
    folder = tmp_path / "in"
    folder.mkdir()
    for path in [*t1.paths, *dwi.paths]:
        (folder / f"{path.parent.name}-{path.name}").write_bytes(path.read_bytes())
    (folder / "README.txt").write_text("not DICOM")
    config = tmp_path / "node.toml"
    config.write_text('[[rules]]\nname = "t1"\nmatch = { SeriesDescription = "T1" }\n')
    result = CliRunner().invoke(main, ["rules", "test", str(folder), "--config", str(config),
                                       "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["series_uid"]: row for row in json.loads(result.output)}
    t1_uid = pydicom.dcmread(t1.paths[0]).SeriesInstanceUID
    dwi_uid = pydicom.dcmread(dwi.paths[0]).SeriesInstanceUID
    assert rows[t1_uid]["rule"] == "t1" and rows[t1_uid]["destinations"] == ["pacs"]
    assert rows[t1_uid]["model_identity"] == read_card("default").identity
    assert rows[dwi_uid]["rule"] is None and NO_RULE_MATCHES in rows[dwi_uid]["ignored_reason"]
    text = CliRunner().invoke(main, ["rules", "test", str(folder), "--config", str(config)])
    assert text.exit_code == 0 and f"{t1_uid}  T1 AX (MR), 2 image(s)" in text.output
    assert "  rule: none\n  ignored: no rule matches (t1: SeriesDescription='DWI b1000')" \
        in text.output


def test_rules_test_needs_a_folder_or_a_series(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["rules", "test"])
    assert result.exit_code != 0 and "give a FOLDER or --series UID" in result.output
    empty = CliRunner().invoke(main, ["rules", "test", str(tmp_path)])
    assert empty.exit_code != 0 and "no DICOM files under" in empty.output


def test_the_example_configs_commented_rules_load(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "config" / "denoised-node.example.toml"
    text = example.read_text()
    tail = text[text.index("# A test PACS"):]
    # Uncomment the TOML lines (tables and keys), keep the prose as comments.
    uncommented = "\n".join(line[2:] if re.match(r"# (\[|\w+ = )", line) else line
                            for line in tail.splitlines())
    config = tmp_path / "node.toml"
    config.write_text(text[:text.index("# A test PACS")] + uncommented)
    settings = load_settings(config, environ={})
    assert [r.name for r in settings.rules] == ["skip-scouts", "brain-t1", "t2-trial"]
    assert [d.name for d in settings.rule_destinations(settings.rules[2])] == ["test-pacs"]
    assert settings.rules[1].match["SeriesDescription"] == r"(?i)\bt1\b"


def test_rules_test_says_what_the_node_would_do_with_ct_and_truncated_files(  # type: ignore[no-untyped-def]
        tmp_path: Path, mr_series_factory) -> None:
    """It said "no rule matches (default: Modality='CT')" for CT, and offered to denoise
    truncated files: the node ignores both, and says why."""
    ct = mr_series_factory(slices=3, sop_class_uid=pydicom.uid.CTImageStorage, modality="CT",
                           seed=3)
    cut = mr_series_factory(slices=2, series_description="T1 AX", seed=4)
    for path in cut.paths:
        path.write_bytes(path.read_bytes()[:-4000])  # the pixel data cut short
    for source, expected in ((ct, "ignored: not an MR image (CT Image Storage)"),
                             (cut, "ignored: refused on receipt: the dataset is truncated")):
        result = CliRunner().invoke(main, ["rules", "test", str(source.directory)])
        assert result.exit_code == 0, result.output
        assert expected in result.output and "model:" not in result.output, result.output
