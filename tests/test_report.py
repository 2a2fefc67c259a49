"""Run folders are atomic and complete; results.json is versioned JSON; report.html is self-contained."""

from __future__ import annotations

import json
import math
import re
import time

import numpy as np
import pytest

from lmsurgeon.errors import OutputExists
from lmsurgeon.report import Report, RunFolder, Section
from lmsurgeon.report.figures import new_figure
from lmsurgeon.report.html import format_cell
from lmsurgeon.report.progress import show_stage_lines, stage, task
from lmsurgeon.report.results import jsonable
from lmsurgeon.report.runfolder import COMPLETE_MARKER, is_complete


def write_run(out, fail: bool = False, **kw):
    with RunFolder(out, command="unit", seed=3, **kw) as run:
        fig, ax = new_figure()
        ax.plot([0, 1], [1, 0])
        rel = run.save_figure(fig, "line")
        results = run.write_results({"value": np.float32(0.5), "undefined": math.nan, "arr": np.arange(3)})
        table = [{"name": "layer 0", "x": 1.0, "y": None}]
        run.write_report(
            Report(
                title="Unit <run>",
                summary={"verdict": "ok"},
                how_to_read="Read me.",
                sections=[Section("Numbers", text="a & b", table=table, figures=[rel])],
            )
        )
        assert run.path != out
        assert out.exists() == bool(kw.get("overwrite"))
        if fail:
            raise RuntimeError("boom")
    return run, results


def test_completed_run_is_renamed_into_place_with_marker(tmp_path):
    out = tmp_path / "runs" / "r1"
    run, results = write_run(out)
    assert run.path == out
    assert is_complete(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([COMPLETE_MARKER, "figures", "report.html", "results.json"])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp sibling left


def test_failed_run_leaves_nothing_behind(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(RuntimeError):
        write_run(out, fail=True)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_results_json_is_strict_json_with_schema_and_provenance(tmp_path):
    out = tmp_path / "r"
    started = time.time()
    _, returned = write_run(out)
    elapsed = time.time() - started
    text = (out / "results.json").read_text()
    on_disk = json.loads(text)  # would fail on NaN: allow_nan=False when writing
    assert "NaN" not in text
    assert on_disk == returned
    assert on_disk["schema"] == "lmsurgeon/unit@1"
    assert on_disk["seed"] == 3
    assert on_disk["value"] == 0.5
    assert on_disk["undefined"] is None
    assert on_disk["arr"] == [0, 1, 2]
    assert {"lmsurgeon", "torch", "numpy"} <= set(on_disk["versions"])
    assert 0 < on_disk["timings"]["total_seconds"] <= elapsed  # the run's own duration, not a timestamp


def test_report_is_self_contained_and_escapes_text(tmp_path):
    out = tmp_path / "r"
    write_run(out)
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html
    assert not re.search(r'(src|href)="(?!data:|#)[^"]+\.(png|css|js)"', html)  # nothing fetched from outside
    assert "Unit &lt;run&gt;" in html
    assert "a &amp; b" in html


def test_existing_non_empty_output_is_not_overwritten_unless_asked(tmp_path):
    out = tmp_path / "r"
    write_run(out)
    with pytest.raises(OutputExists, match="exists"):
        write_run(out)
    write_run(out, overwrite=True)
    assert is_complete(out)


def test_jsonable_turns_non_finite_numbers_into_null():
    assert jsonable({"a": [np.inf, -np.inf, np.nan, np.int64(2)], "b": (1, 2)}) == {
        "a": [None, None, None, 2],
        "b": [1, 2],
    }


@pytest.mark.parametrize(
    "value,text", [(None, "—"), (math.nan, "—"), (0.123456, "0.1235"), (1e-7, "1.000e-07"), (True, "yes"), (3, "3")]
)
def test_cells_render_at_readable_precision(value, text):
    assert format_cell(value) == text


def test_numbers_are_right_aligned_and_text_left(tmp_path):
    out = tmp_path / "r"
    write_run(out)
    html = (out / "report.html").read_text()
    assert '<td class="num">1</td>' in html
    assert "<td>layer 0</td>" in html
    assert "<td>—</td>" in html


def test_library_calls_print_no_stage_lines(capsys):
    stage("load")
    with task("train", 3, enabled=False) as advance:
        advance(3)
    assert capsys.readouterr().err == ""


def test_stage_lines_print_one_timed_line_per_stage_on_stderr(capsys):
    show_stage_lines(True)
    try:
        stage("load")
        with task("train", 3, enabled=False) as advance:
            for step in range(3):
                advance(step + 1)
    finally:
        show_stage_lines(False)
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert [re.sub(r"^\[ *\d+\.\d s\] ", "", line) for line in lines] == ["load", "train (3 steps)"]
