"""The demo report names its source run in report.md and in every PNG's text chunk; `mlcd demo
--docs DIR` publishes them together; the README's pictures are from the run docs/demo/report.md
(the README's tables) came from."""
from __future__ import annotations

import json
import re

import pytest
from conftest import ROOT
from PIL import Image

from launch.report import publish, read_stamp, source_id, write_report


def _fake_run(out):
    """A run folder as the demo stages leave it: metrics with eval-during-training records, and
    two contact sheets (clustering/report.py's names)."""
    recs = []
    for step in range(2, 21, 2):
        r = {"step": step, "loss": 10.0 - step / 4, "samples_per_s": 50.0}
        if step % 8 == 0 or step == 20:
            r.update({"eval/clip/knn_top1": 0.2 + step / 100, "eval/fm/knn_top1": 0.1 + step / 200,
                      "eval/seconds": 1.5})
        recs.append(r)
    (out / "train").mkdir(parents=True)
    (out / "train" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    rep = out / "clusters" / "report"
    rep.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40, 30), (60 * i, 0, 0)).save(rep / f"sheet_{i:03d}.png")
    return {"run_id": "demo@20261202T000000Z",
            "stages": {"train": {"done": True, "seconds": 9.0, "steps_done": 20, "steps_planned": 20}}}


def test_report_stamps_its_pngs_and_publishes_them_together(tmp_path):
    out = tmp_path / "run"
    state = _fake_run(out)
    text = write_report(out, state, "configs/debug.yaml", [])
    src = source_id(state)
    assert src == "demo@20261202T000000Z step 20" and f"Source run: `{src}`" in text
    # accuracy over steps: one row per evaluated step, in percent
    table = text.split("## Accuracy during training")[1]
    assert "| step | clip/knn_top1 | fm/knn_top1 |" in table
    assert "| 8 | 28.0 | 14.0 |" in table and "| 16 | 36.0 | 18.0 |" in table and "| 20 | 40.0 | 20.0 |" in table
    assert "| 10 |" not in table and "4.5 s of evaluation" in table
    for png in ("loss_curve.png", "eval_curve.png"):
        assert read_stamp(out / png) == src
    docs = tmp_path / "docs"
    written = {p.name for p in publish(out, docs)}
    assert written == {"loss_curve.png", "eval_curve.png", "contact_sheet.png", "contact_sheet_2.png",
                       "contact_sheet_3.png", "report.md"}
    for png in docs.glob("*.png"):
        assert read_stamp(png) == src
    with Image.open(docs / "contact_sheet_2.png") as a, Image.open(out / "clusters/report/sheet_001.png") as b:
        assert a.tobytes() == b.tobytes()  # the picture itself unchanged
    doc_text = (docs / "report.md").read_text()
    assert "](contact_sheet.png)" in doc_text and "](clusters/" not in doc_text
    # a report written by an older version (no source line) is refused, not published unnamed
    (out / "report.md").write_text("# old report\n")
    with pytest.raises(ValueError, match="Source run"):
        publish(out, tmp_path / "docs2")


def test_readme_pictures_come_from_the_run_of_docs_demo_report():
    readme = (ROOT / "README.md").read_text()
    pngs = sorted(set(re.findall(r"(docs/demo/[\w.-]+\.png)", readme)))
    assert pngs and all((ROOT / p).is_file() for p in pngs), pngs
    report = ROOT / "docs" / "demo" / "report.md"
    if not report.is_file():
        pytest.skip("docs/demo/report.md not published yet: run `mlcd demo --docs docs/demo` "
                    "(or `python -m launch.demo --only report --docs docs/demo` on a finished run)")
    m = re.search(r"Source run: `([^`]+)`", report.read_text())
    assert m, f"{report}: no 'Source run' line"
    for p in pngs:
        assert read_stamp(ROOT / p) == m.group(1), f"{p} is not from the run of {report}"
