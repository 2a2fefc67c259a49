"""``lmsurgeon demo`` end to end on the test zoo: every run present, complete and linked from one report."""

from __future__ import annotations

import json
import re

from lmsurgeon.cli import main
from lmsurgeon.report.runfolder import is_complete


def test_demo_writes_every_run_and_one_report_linking_them(tmp_path, test_zoo, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--profile", "test", "--merge-trials", "2", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert set(runs) == {"lineage-zoo", "lineage-minilm", "swap-deep", "swap-minilm", "merge", "generation"}
    for name, run in runs.items():
        assert is_complete(out / name), name
        assert run["schema"] == json.loads((out / name / "results.json").read_text())["schema"]
        assert run["result"] and run["result"] in printed
    html = (out / "report.html").read_text()
    links = set(re.findall(r'href="([^"]+/report\.html)"', html))
    assert links == {f"{name}/report.html" for name in runs}
    assert is_complete(out) and str(out.resolve()) in printed
    verdicts = runs["lineage-zoo"]["verdicts"]
    assert not [pair for pair, v in verdicts.items() if "indep" in pair and v == "derived"]
