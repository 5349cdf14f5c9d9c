"""The generated tables of README.md and docs/*.md match what ``dece-ds docs tables`` prints from the
committed results files and from ``DeceConfig``; no hand-written table sits outside the markers."""

from __future__ import annotations

import json
import re

import pytest

from dece_ds import docs_tables as dt
from dece_ds.cli import main
from dece_ds.config import DeceConfig

DOC_FILES = dt.doc_files(dt.REPO)
IDS = [str(p.relative_to(dt.REPO)) for p in DOC_FILES]


def test_the_readme_and_every_docs_page_are_checked():
    names = {p.name for p in DOC_FILES}
    assert {"README.md", "design.md", "backdoor.md", "continued-pretraining.md", "planning.md",
            "benchmarks.md", "reliability.md"} <= names


@pytest.mark.parametrize("path", DOC_FILES, ids=IDS)
def test_committed_tables_match_their_sources(path):
    new, changed = dt.regenerate(path.read_text(), dt.REPO)
    assert not changed, (f"{path.name}: tables {changed} differ from their results files; "
                         "regenerate with: dece-ds docs tables --write")


@pytest.mark.parametrize("path", DOC_FILES, ids=IDS)
def test_every_table_sits_between_markers(path):
    """A Markdown table outside <!-- table:... --> markers would be a hand-copied one."""
    text = path.read_text()
    text = dt.MARKER_RE.sub("", text)
    text = re.sub(r"<!-- reliability-table:begin -->.*?<!-- reliability-table:end -->", "", text, flags=re.S)
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    stray = [line for line in text.splitlines() if re.match(r"\s*\|.*\|\s*$", line)]
    assert not stray, f"{path.name}: table rows outside generated markers: {stray[:3]}"


def test_markers_are_balanced():
    for path in DOC_FILES:
        text = path.read_text()
        opened = re.findall(r"<!-- table:(\S+) -->", text)
        closed = re.findall(r"<!-- /table:(\S+) -->", text)
        assert sorted(opened) == sorted(closed), path.name
        assert len(dt.table_names(text)) == len(opened), f"{path.name}: a marker pair did not match"


def test_check_mode_passes_and_names_a_drifted_table(tmp_path, capsys):
    assert main(["docs", "tables", "--check"]) == 0
    page = tmp_path / "page.md"
    page.write_text("<!-- table:alpha-targets -->\n| stale |\n<!-- /table:alpha-targets -->\n")
    assert main(["docs", "tables", "--check", str(page)]) == 1
    assert "alpha-targets" in capsys.readouterr().err
    assert main(["docs", "tables", "--write", str(page)]) == 0
    assert main(["docs", "tables", "--check", str(page)]) == 0
    assert "| 0.980 | 2 | 0.990 |" in page.read_text()


def test_unknown_table_or_missing_file_is_an_error_not_a_table(tmp_path, capsys):
    page = tmp_path / "page.md"
    page.write_text("<!-- table:no-such-kind -->\n<!-- /table:no-such-kind -->\n")
    assert main(["docs", "tables", "--check", str(page)]) == 2
    assert "unknown table 'no-such-kind'" in capsys.readouterr().err
    page.write_text("<!-- table:backdoor-runs:no-such-file -->\n<!-- /table:backdoor-runs:no-such-file -->\n")
    assert main(["docs", "tables", "--check", str(page)]) == 2
    assert "no-such-file.json" in capsys.readouterr().err


def test_config_table_lists_every_field_of_the_model(capsys):
    assert main(["config-schema"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| key | type | default | meaning |")
    keys = re.findall(r"^\| `(\w+)` \|", out, flags=re.M)
    assert keys == list(DeceConfig.model_fields)
    for name, field in DeceConfig.model_fields.items():
        assert f"`{json.dumps(field.default)}`" in out.split(f"| `{name}` |")[1].splitlines()[0]


def test_config_table_follows_new_fields():
    """Generated at run time from model_fields: a field another module adds appears without edits."""
    from pydantic import Field, create_model
    extended = create_model("Extended", __base__=DeceConfig,
                            new_knob=(int, Field(3, ge=1, description="a knob added later")))
    table = dt.config_table(model=extended)
    assert table.splitlines()[2:] [:len(DeceConfig.model_fields)] == dt.config_table().splitlines()[2:]
    assert table.splitlines()[-1] == "| `new_knob` | int (≥ 1) | `3` | a knob added later |"


def test_config_schema_json_flag(capsys):
    assert main(["config-schema", "--json"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert set(schema["properties"]) == set(DeceConfig.model_fields)


DOCS_TABLES_NAMES = [  # every name of dece_ds/docs_tables.py that other modules or tests used, before the split
    "BACKDOOR", "FUSED_METHODS", "GENERATORS", "HEADLINE_SPECS", "MARKER_RE", "REPO", "RESULTS", "TableError",
    "_f", "_load", "_md", "_provenance_line", "_stems", "add_parser", "alpha_targets", "backdoor_combined",
    "backdoor_epochs", "backdoor_headline", "backdoor_runs", "bench_dece", "bench_fused_linear", "bench_step_time",
    "bench_vocab_parallel", "config_schema_json", "config_table", "doc_files", "plan_table", "planner_validation",
    "presets_table", "regenerate", "render", "stale_tables", "table_names",
]


def test_docs_tables_still_exports_every_name_it_had():
    assert [n for n in DOCS_TABLES_NAMES if not hasattr(dt, n)] == []
    assert (dt.REPO / "README.md").is_file()


def test_every_registered_kind_is_a_marker_name_and_resolves():
    """A kind the marker pattern can hold (no ':', no blank), and a lazy one names a function that exists."""
    import importlib
    for kind, generate in dt.GENERATORS.items():
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", kind), kind
        if hasattr(generate, "target"):
            module, _, name = generate.target.partition(":")
            assert callable(getattr(importlib.import_module(module), name)), generate.target


def test_a_new_kind_is_one_registry_entry(tmp_path, monkeypatch):
    """What a module outside the package does to add a table: a lazy entry, then a marker in a page."""
    monkeypatch.setitem(dt.GENERATORS, "path-join", dt.lazy("os.path:join"))  # (root, arg) -> "root/arg"
    page = tmp_path / "page.md"
    page.write_text("x\n<!-- table:path-join:abc -->\nold\n<!-- /table:path-join:abc -->\ny\n")
    new, changed = dt.regenerate(page.read_text(), tmp_path)
    assert changed == ["path-join:abc"]
    assert new == f"x\n<!-- table:path-join:abc -->\n{tmp_path}/abc\n<!-- /table:path-join:abc -->\ny\n"
    with pytest.raises(dt.TableError, match="expected 'package.module:function'"):
        dt.lazy("json.dumps")
