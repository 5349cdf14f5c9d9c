"""DeceConfig: defaults, bounds, forbidden extras, frozen, from_ds_config round trips and errors that
name the field (``dece.<field>``) and show the bad value; the ``dece-ds`` config commands."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from dece_ds import DeceConfig, DeceConfigError
from dece_ds.cli import main
from dece_ds.config import read_ds_config

REPO = Path(__file__).resolve().parents[1]

DEFAULTS = {
    "enabled": True, "label_smoothing": 0.05, "alpha_base": 0.99, "schedule": "epoch",
    "steps_per_epoch": None, "prob_floor": 1e-7, "ignore_index": -100, "reduction": "mean",
    "chunk_size": None, "chunk_budget_mib": None, "z_loss": 0.0, "logit_softcap": None, "backend": "eager", "fused_linear": False,
    "fused_weight_grad_walk": "auto", "ce_warmup_epochs": 0,
    "alpha_min": 0.0, "preset": None,
    "audit": None,
}


def test_defaults():
    cfg = DeceConfig()
    assert cfg.model_dump() == DEFAULTS
    assert set(DeceConfig.model_fields) == set(DEFAULTS)


# --- bounds -------------------------------------------------------------------------------------------

VALID = [
    ("label_smoothing", 0.0), ("label_smoothing", 0.999), ("alpha_base", 1.0), ("alpha_base", 1e-6),
    ("steps_per_epoch", 1), ("steps_per_epoch", 10_000), ("prob_floor", 0.0), ("prob_floor", 0.5),
    ("schedule", "constant"), ("reduction", "sum"), ("reduction", "none"), ("chunk_size", 1),
    ("ce_warmup_epochs", 3), ("ignore_index", -1), ("fused_linear", True), ("enabled", False),
    ("alpha_min", 0.5), ("alpha_min", 0.99), ("preset", "paper"), ("preset", "backdoor_guard"),
    ("z_loss", 1e-4), ("z_loss", 0.0), ("logit_softcap", 30.0), ("logit_softcap", None), ("chunk_budget_mib", 64),
    ("chunk_budget_mib", 0.5), ("backend", "compile"), ("backend", "eager"),
    ("fused_weight_grad_walk", "rows"), ("fused_weight_grad_walk", "vocab"),
]

INVALID = [
    ("label_smoothing", 1.0), ("label_smoothing", 1.5), ("label_smoothing", -0.01),
    ("alpha_base", 0.0), ("alpha_base", -0.5), ("alpha_base", 1.01), ("alpha_base", float("nan")),
    ("steps_per_epoch", 0), ("steps_per_epoch", -4), ("steps_per_epoch", 2.5),
    ("prob_floor", -1e-9), ("prob_floor", 1.0),
    ("schedule", "linear"), ("schedule", "Epoch"), ("reduction", "avg"), ("reduction", None),
    ("chunk_size", 0), ("ce_warmup_epochs", -1), ("ignore_index", "x"),
    ("alpha_min", -0.1), ("alpha_min", 1.5), ("alpha_min", 0.995), ("preset", "guard"), ("preset", 1), ("preset", ["paper"]),
    ("z_loss", -1e-4), ("z_loss", float("inf")), ("logit_softcap", 0.0), ("logit_softcap", -3.0),
    ("chunk_budget_mib", 0), ("chunk_budget_mib", -1.0), ("backend", "jit"), ("backend", None),
    ("fused_weight_grad_walk", "columns"), ("fused_weight_grad_walk", None),
]


@pytest.mark.parametrize("field,value", VALID)
def test_valid_values(field, value):
    extra = {"steps_per_epoch": 10} if field == "schedule" else {}
    cfg = DeceConfig.from_dict({field: value, **extra})
    assert getattr(cfg, field) == value


@pytest.mark.parametrize("field,value", INVALID)
def test_invalid_values_name_field_and_value(field, value):
    with pytest.raises(DeceConfigError) as e:
        DeceConfig.from_dict({field: value})
    msg = str(e.value)
    assert f"dece.{field}" in msg
    assert repr(value) in msg
    # the plain constructor rejects the same value, naming the field
    with pytest.raises(ValidationError, match=field):
        DeceConfig(**{field: value})


def test_error_is_a_value_error():
    assert issubclass(DeceConfigError, ValueError)


def test_all_errors_reported_together():
    with pytest.raises(DeceConfigError) as e:
        DeceConfig.from_dict({"alpha_base": 2.0, "label_smoothing": -1.0, "reduction": "avg"})
    msg = str(e.value)
    for field in ("alpha_base", "label_smoothing", "reduction"):
        assert f"dece.{field}" in msg
    assert "3 error" in msg


def test_continuous_schedule_needs_steps_per_epoch():
    with pytest.raises(DeceConfigError) as e:
        DeceConfig.from_dict({"schedule": "continuous"})
    msg = str(e.value)
    assert "dece.steps_per_epoch" in msg
    assert "None" in msg
    assert DeceConfig.from_dict({"schedule": "continuous", "steps_per_epoch": 5}).steps_per_epoch == 5


def test_unknown_key_is_named():
    with pytest.raises(DeceConfigError) as e:
        DeceConfig.from_dict({"alpha": 0.9})
    msg = str(e.value)
    assert "dece.alpha" in msg and "unknown key" in msg
    assert "alpha_base" in msg  # the allowed keys are listed
    with pytest.raises(ValidationError, match="alpha"):
        DeceConfig(alpha=0.9)


def test_frozen():
    cfg = DeceConfig()
    with pytest.raises(ValidationError, match="alpha_base"):
        cfg.alpha_base = 0.5
    assert cfg.alpha_base == 0.99
    assert hash(cfg) == hash(DeceConfig())  # frozen models hash by value


# --- presets ------------------------------------------------------------------------------------------

def test_paper_preset_is_the_released_codes_defaults():
    cfg = DeceConfig.from_dict({"preset": "paper"})
    assert (cfg.alpha_base, cfg.label_smoothing, cfg.prob_floor, cfg.schedule) == (0.99, 0.05, 1e-7, "epoch")


def test_backdoor_guard_preset_and_explicit_fields_win():
    cfg = DeceConfig.from_ds_config({"dece": {"preset": "backdoor_guard"}})
    assert (cfg.alpha_base, cfg.label_smoothing, cfg.prob_floor, cfg.schedule) == (0.97, 0.05, 1e-7, "epoch")
    over = DeceConfig.from_dict({"preset": "backdoor_guard", "alpha_base": 0.9, "ce_warmup_epochs": 1})
    assert (over.alpha_base, over.ce_warmup_epochs, over.label_smoothing) == (0.9, 1, 0.05)


def test_unknown_preset_is_named():
    with pytest.raises(DeceConfigError, match=r"dece\.preset.*'guard'"):
        DeceConfig.from_dict({"preset": "guard"})


# --- from_ds_config / to_ds_section -----------------------------------------------------------------

CONFIGS = [
    {},
    {"label_smoothing": 0.1, "alpha_base": 0.98},
    {"schedule": "continuous", "steps_per_epoch": 250, "prob_floor": 0.0, "reduction": "sum"},
    {"enabled": False, "schedule": "constant", "alpha_base": 0.8, "chunk_size": 64, "fused_linear": True,
     "ce_warmup_epochs": 2, "ignore_index": -1},
    {"preset": "backdoor_guard", "alpha_min": 0.5},
]


@pytest.mark.parametrize("section", CONFIGS)
def test_round_trip_dict(section):
    cfg = DeceConfig.from_ds_config({"train_batch_size": 8, "dece": section})
    for key, value in section.items():
        assert getattr(cfg, key) == value
    out = cfg.to_ds_section()
    json.dumps(out)  # JSON-ready
    assert DeceConfig.from_ds_config({"dece": out}) == cfg


@pytest.mark.parametrize("section", CONFIGS)
@pytest.mark.parametrize("as_str", [True, False])
def test_round_trip_json_file(tmp_path, section, as_str):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True},
                                "dece": section}))
    cfg = DeceConfig.from_ds_config(str(path) if as_str else path)
    assert cfg == DeceConfig(**section)
    path2 = tmp_path / "again.json"
    path2.write_text(json.dumps({"dece": cfg.to_ds_section()}))
    assert DeceConfig.from_ds_config(path2) == cfg


def test_missing_section_means_disabled(tmp_path):
    assert DeceConfig.from_ds_config({"train_batch_size": 8}).enabled is False
    assert DeceConfig.from_ds_config(None).enabled is False
    path = tmp_path / "plain.json"
    path.write_text(json.dumps({"train_batch_size": 8}))
    assert DeceConfig.from_ds_config(path) == DeceConfig(enabled=False)


def test_section_that_is_already_a_config():
    cfg = DeceConfig(alpha_base=0.9)
    assert DeceConfig.from_ds_config({"dece": cfg}) is cfg


def test_bad_json_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"dece": {"alpha_base": 0.9,}')
    with pytest.raises(DeceConfigError) as e:
        DeceConfig.from_ds_config(path)
    assert str(path) in str(e.value) and "JSON" in str(e.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(DeceConfigError) as e:
        DeceConfig.from_ds_config(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("section", [[1, 2], "epoch", 0.99, True, None])
def test_non_dict_section(section):
    with pytest.raises(DeceConfigError) as e:
        DeceConfig.from_ds_config({"dece": section})
    assert str(e.value).startswith("dece: expected an object; omit the section or set enabled: false")
    assert ("null" if section is None else repr(section)) in str(e.value)


def test_bad_argument_type():
    with pytest.raises(DeceConfigError, match="ds_config"):
        DeceConfig.from_ds_config(42)


def test_bad_field_in_file_names_it(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"dece": {"alpha_base": 1.5, "sheduel": "epoch"}}))
    with pytest.raises(DeceConfigError) as e:
        DeceConfig.from_ds_config(path)
    msg = str(e.value)
    assert "dece.alpha_base" in msg and "1.5" in msg
    assert "dece.sheduel" in msg


# --- one meaning of the section: absent = off, {} = defaults, null = error --------------------------------

def test_section_meanings_absent_empty_null(tmp_path):
    assert DeceConfig.from_ds_config({"train_batch_size": 8}) == DeceConfig(enabled=False)
    assert DeceConfig.from_ds_config({"dece": {}}) == DeceConfig()  # enabled, every default
    assert DeceConfig.from_ds_config({"dece": {}}).enabled is True
    assert DeceConfig.from_ds_config({"dece": {"enabled": False}}).enabled is False
    with pytest.raises(DeceConfigError) as e:
        DeceConfig.from_ds_config({"dece": None})
    assert str(e.value) == ("dece: expected an object; omit the section or set enabled: false to disable "
                            "(got null)")
    path = tmp_path / "null_section.json"
    path.write_text('{"train_batch_size": 8, "dece": null}')
    with pytest.raises(DeceConfigError, match=rf"^{re.escape(str(path))}: dece: expected an object"):
        DeceConfig.from_ds_config(path)


def test_section_meanings_are_documented():
    doc = DeceConfig.from_ds_config.__doc__
    assert '"dece": {}' in doc and '"dece": null' in doc and "no ``\"dece\"`` key" in doc
    description = DeceConfig.model_fields["enabled"].description
    assert "no 'dece' section = disabled" in description and '"dece": null' in description


# --- read_ds_config: one line naming the file -------------------------------------------------------------

def bad_config_file(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A bad DeepSpeed config file of the given kind and the part of the one-line message that names it."""
    path = tmp_path / f"{kind}.json"
    content, expected = {
        "list": ("[1, 2]", "expected a JSON object at the top level, got a list"),
        "string": ('"ds.json"', "expected a JSON object at the top level, got a string"),
        "null": ("null", "expected a JSON object at the top level, got null"),
        "number": ("3", "expected a JSON object at the top level, got a number"),
        "invalid": ('{"dece": {"alpha_base": 0.9,}}', "invalid JSON at line 1 column 29: Expecting property name"),
        "empty": ("  \n", "empty file; expected"),
        "duplicate": ('{"dece": {}, "dece": {"enabled": false}}', "key 'dece' appears twice in one JSON object"),
        "latin1": (None, "not UTF-8 text (byte 0xe9 at offset 16)"),
        "directory": (None, "is a directory (expected"),
        "missing": (None, "no such file (expected"),
    }[kind]
    if kind == "latin1":
        path.write_bytes('{"comment": "caf\u00e9"}'.encode("latin-1"))
    elif kind == "directory":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    return path, expected


BAD_FILES = ["list", "string", "null", "number", "invalid", "empty", "duplicate", "latin1", "directory", "missing"]


@pytest.mark.parametrize("kind", BAD_FILES)
def test_read_ds_config_bad_file_is_one_line_naming_it(tmp_path, kind):
    path, expected = bad_config_file(tmp_path, kind)
    for read in (read_ds_config, DeceConfig.from_ds_config):
        with pytest.raises(DeceConfigError) as e:
            read(path)
        msg = str(e.value)
        assert msg.startswith(f"{path}: ") and expected in msg, msg
        assert "\n" not in msg


def test_read_ds_config_returns_the_object(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"train_batch_size": 8, "dece": {}}')
    assert read_ds_config(path) == read_ds_config(str(path)) == {"train_batch_size": 8, "dece": {}}


SHIPPED = sorted(p for p in (REPO / "ds_configs").rglob("*.json"))


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_shipped_ds_configs_load(path):
    """What each shipped file says is what DeceConfig holds. (tests/test_ds_configs.py checks the same files
    against the engine's rules and DeepSpeed's own DeepSpeedConfig.)"""
    raw = read_ds_config(path)  # an object, UTF-8, no key given twice
    section = raw["dece"]
    assert isinstance(section, dict), f"{path.name}: the dece section is an object"
    cfg = DeceConfig.from_ds_config(path)
    assert cfg.enabled is section.get("enabled", True)
    for key, value in section.items():
        assert getattr(cfg, key) == value, f"{path.name}: dece.{key}"
    untouched = {k: v for k, v in cfg.model_dump().items() if k not in section}
    assert untouched == {k: DEFAULTS[k] for k in untouched}, f"{path.name}: a field the file leaves out moved"


# --- CLI ------------------------------------------------------------------------------------------------

def test_cli_config_schema(capsys):
    assert main(["config-schema", "--json"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    props = schema["properties"]
    assert set(props) == set(DEFAULTS)
    assert props["label_smoothing"]["minimum"] == 0 and props["label_smoothing"]["exclusiveMaximum"] == 1
    number, auto = props["alpha_base"]["anyOf"]  # a number in (0, 1], or "auto" (dece_ds.auto_alpha)
    assert number["exclusiveMinimum"] == 0 and number["maximum"] == 1 and auto["const"] == "auto"
    assert set(props["reduction"]["enum"]) == {"mean", "sum", "none"}
    assert set(props["schedule"]["enum"]) == {"epoch", "continuous", "constant"}
    for name, prop in props.items():
        assert prop.get("description"), f"{name} has no description"
        assert prop.get("default", "missing") == DEFAULTS[name]


def test_cli_check_config_ok(tmp_path, capsys):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"dece": {"alpha_base": 0.985, "label_smoothing": 0.05}}))
    assert main(["check-config", str(path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert DeceConfig.from_ds_config({"dece": printed}) == DeceConfig(alpha_base=0.985)


def test_cli_check_config_without_section(tmp_path, capsys):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 1}))
    assert main(["check-config", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["enabled"] is False


@pytest.mark.parametrize("content", [json.dumps({"dece": {"alpha_base": 0}}), "{not json",
                                     json.dumps({"dece": [1]}), None])
def test_cli_check_config_bad(tmp_path, capsys, content):
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    assert main(["check-config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip()
    if "alpha_base" in (content or ""):
        assert "dece.alpha_base" in captured.err and "(got 0)" in captured.err


def test_cli_requires_a_command(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


@pytest.mark.parametrize("kind", BAD_FILES)
def test_cli_check_config_bad_file_is_one_line(tmp_path, capsys, kind):
    path, expected = bad_config_file(tmp_path, kind)
    assert main(["check-config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"dece-ds check-config: error: {path}: ") and expected in err
    assert err.count("\n") == 1, err


def test_cli_check_config_null_section_is_an_error(tmp_path, capsys):
    path = tmp_path / "ds.json"
    path.write_text('{"dece": null}')
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err == (f"dece-ds check-config: error: {path}: dece: expected an object; omit the "
                                       "section or set enabled: false to disable (got null)\n")
    path.write_text('{"dece": {}}')
    assert main(["check-config", str(path)]) == 0
    assert json.loads(capsys.readouterr().out) == DeceConfig().to_ds_section()
