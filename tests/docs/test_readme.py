"""The README's first screen: the two set-up commands CI runs, unchanged, and the DeepSpeed ``dece`` section."""

from __future__ import annotations

import re

from dece_ds.docs_tables import REPO

README = REPO / "README.md"
MAIN_JOB = ("bash launch/setup.sh && .venv/bin/deepspeed --num_gpus 1 launch/backdoor_demo.py "
            "--out runs/backdoor/demo")
TESTS = "bash launch/setup.sh && .venv/bin/python -m pytest -q tests"
FIRST_SCREEN = 40


def first_screen() -> str:
    return "\n".join(README.read_text().splitlines()[:FIRST_SCREEN])


def test_first_screen_holds_the_two_commands():
    lines = [ln.strip() for ln in first_screen().splitlines()]
    assert MAIN_JOB in lines
    assert TESTS in lines
    assert lines.index(MAIN_JOB) < lines.index(TESTS)


def test_ci_runs_the_readme_test_command():
    ci = REPO / ".ci" / "run"
    if ci.exists():
        assert TESTS in ci.read_text()


def test_first_screen_holds_the_deepspeed_dece_section():
    screen = first_screen()
    assert re.search(r'^"dece": \{', screen, flags=re.M), "no top-level \"dece\" section in the first screen"
    assert "dece_ds.initialize(" in screen


def test_readme_is_a_front_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 210
    for page in ("design", "backdoor", "continued-pretraining", "planning", "benchmarks", "reliability"):
        assert f"(docs/{page}.md" in text, f"README does not link docs/{page}.md"
        assert (REPO / "docs" / f"{page}.md").is_file()
    for way_in in ("dece_ds.initialize", "apply_dece_to_trainer", "apply_dece_to_megatron", "dece_loss",
                   "vocab_parallel_dece", "fused_linear_dece", "launch/continue_pretraining.py"):
        assert way_in in text, f"README has no snippet for {way_in}"
    assert "<!-- table:config -->" in text


def test_every_docs_page_opens_with_its_command():
    for page in sorted((REPO / "docs").glob("*.md")):
        head = "\n".join(page.read_text().splitlines()[:12])
        assert re.search(r"^(\.venv/bin/|dece-ds |OMP_NUM_THREADS=)", head, flags=re.M), \
            f"{page.name} does not open with the command that reproduces it"


def test_reliability_page_keeps_its_table_markers():
    text = (REPO / "docs" / "reliability.md").read_text()
    begin, end = "<!-- reliability-table:begin -->", "<!-- reliability-table:end -->"
    assert text.count(begin) == 1 and text.count(end) == 1 and text.index(begin) < text.index(end)
    table = text[text.index(begin):text.index(end)]
    assert "| bad input or fault | what the user gets | test |" in table
