"""reporting.html: every section from a realistic run, escaping, gaps, SVG counts, images."""
from __future__ import annotations

import base64
import io
import math
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from reporting.html import (format_bytes, format_number, format_seconds, render_run_report,
                                       write_run_report)

MODELS = ("teacher", "student (pretrained)", "student (4-step)", "reference: SD-1.5")
GENEVAL = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
DPG = ("entity", "attribute", "relation", "global", "other")


def png_bytes(seed: int, size: tuple[int, int] = (96, 64)) -> bytes:
    """A real, non-uniform RGB PNG (gradient + noise blocks)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1),
                    np.full_like(xx, 40 * seed % 255)], -1).astype(np.uint8)
    img[: h // 2, : w // 2] = rng.integers(0, 256, (h // 2, w // 2, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def realistic_report_data(image_dir: Path | None = None) -> dict[str, Any]:
    """What flows/ hands the report after a toy CPU end-to-end run; images as files when image_dir."""
    steps = np.arange(0, 601, 10)
    loss = 1.2 * np.exp(-steps / 150) + 0.08 + 0.02 * np.sin(steps / 7)
    val = [[int(s), float(v)] for s, v in zip(steps[::10], loss[::10] + 0.03)]
    images: list[dict[str, Any]] = []
    for i, (title, caption) in enumerate((("teacher samples", "8 GenEval prompts × 4 seeds, 28 steps, cfg 4.5"),
                                          ("student (pretrained) samples", "same prompts and seeds, 28 steps"),
                                          ("student (4-step) samples", "same prompts and seeds, 4 steps"))):
        raw = png_bytes(i + 1, (128, 96) if i == 0 else (96, 64))
        if image_dir is not None:
            path = Path(image_dir) / f"grid_{i}.png"
            path.write_bytes(raw)
            images.append({"title": title, "path": str(path), "caption": caption})
        else:
            images.append({"title": title, "png": raw, "caption": caption})
    return {
        "title": "SnapGen end-to-end run · toy-cpu",
        "subtitle": "bootstrap → pretrain → distill → evaluate → export",
        "created": "2025-06-01T12:34:56+00:00",
        "preset": "toy-cpu",
        "run_id": "9f1c2ab37e4d4c0a8b1e2f3a4b5c6d7e",
        "flow_run_id": "6a0d3b2e-1c4f-4e7a-9b8c-0d1e2f3a4b5c",
        "notes": ["CPU demo proves mechanics; quality needs toy-gpu",
                  "GenEval scored by the toy scene parser, not Mask2Former"],
        "key_metrics": {"geneval/overall": 0.4123, "dpg/overall": 0.5561, "fid": 187.234,
                        "clip_score": 0.2481, "export/unet_bytes": 1843200},
        "summary": {"columns": ["model", "steps", "GenEval", "DPG", "FID", "UNet params"],
                    "rows": [["teacher", 28, 0.51234, 0.6012, 150.21, 86_000_000],
                             ["student (pretrained)", 28, 0.4401, 0.5809, 171.5, 380_000],
                             ["student (4-step)", 4, 0.4123, 0.5561, 187.234, 380_000],
                             ["reference: SD-1.5", 50, 0.43, None, None, None]]},
        "stages": [
            {"name": "bootstrap", "seconds": 312.4, "status": "completed", "cache_hit": False,
             "mlflow_run_id": "aa11bb22cc33dd44", "detail": "AE 600 steps, text encoder distilled"},
            {"name": "curate", "seconds": 0.42, "status": "cached", "cache_hit": True,
             "mlflow_run_id": None, "detail": "cache key 3f9e…"},
            {"name": "pretrain", "seconds": 1284.0, "status": "completed", "cache_hit": False,
             "mlflow_run_id": "ee55ff66aa77bb88", "detail": "600 steps, batch 16"},
            {"name": "distill", "seconds": 905.7, "status": "completed", "cache_hit": False,
             "mlflow_run_id": "cc99dd00ee11ff22", "detail": "KD + adversarial, 4 steps"},
            {"name": "evaluate", "seconds": 211.0, "status": "completed", "cache_hit": False,
             "mlflow_run_id": "0011223344556677", "detail": "geneval, dpg, fid, clip"},
            {"name": "export", "seconds": 48.3, "status": "failed", "cache_hit": False,
             "mlflow_run_id": "8899aabbccddeeff", "detail": "coreml: requires macOS"},
        ],
        "curves": {
            "pretrain loss": {"train/loss": [[int(s), float(v)] for s, v in zip(steps, loss)],
                              "val/loss": val},
            "distill losses": {"kd/output": [[0, 0.9], [100, 0.5], [200, float("nan")], [300, 0.3]],
                               "kd/feature": [[0, 2.0], [100, 1.1], [200, 0.7], [300, float("inf")]],
                               "adv/generator": [[300, 0.69]]},
            "learning rate": {"lr": [[0, 1e-5], [50, 1e-4], [600, 1e-6]]},
        },
        "curves_log_y": ["learning rate"],
        "eval_bars": {
            "GenEval (toy parser)": {"categories": list(GENEVAL), "series": {
                "teacher": [0.98, 0.62, 0.41, 0.77, 0.12, 0.18],
                "student (pretrained)": [0.91, 0.51, 0.33, 0.70, 0.10, 0.09],
                "student (4-step)": [0.88, 0.47, 0.30, 0.66, 0.08, None]}},
            "DPG-Bench": {"categories": list(DPG), "series": {
                "teacher": [0.71, 0.66, 0.58, 0.62, 0.49],
                "student (4-step)": [0.61, 0.57, 0.50, 0.55, 0.44],
                "reference: SD-1.5": [0.74, 0.75, 0.73, 0.74, 0.63]}},
        },
        "images": images,
        "exports": [
            {"part": "unet", "format": "onnx", "bytes": 1_843_200, "params": 380_000, "parity": 3.1e-5,
             "passed": True, "path": "out/export/unet.onnx"},
            {"part": "decoder", "format": "onnx", "bytes": 412_160, "params": 96_000, "parity": 8.2e-6,
             "passed": True, "path": "out/export/decoder.onnx"},
            {"part": "unet", "format": "coreml", "bytes": None, "params": None, "parity": None,
             "passed": None, "path": None},
        ],
        "lineage": {"dataset hash": "sha256:5e3b9c0d1f", "teacher id": "snapgen-toy-teacher@v3",
                    "config hash": "c0ffee12", "git commit": "390d670",
                    "parent runs": ["aa11bb22cc33dd44", "ee55ff66aa77bb88"]},
        "links": {"MLflow run": "http://127.0.0.1:5000/#/experiments/1/runs/9f1c2ab37e4d4c0a8b1e2f3a4b5c6d7e",
                  "Prefect flow run": "http://127.0.0.1:4200/runs/flow-run/6a0d3b2e-1c4f-4e7a-9b8c-0d1e2f3a4b5c"},
        "missing": {"exports": "Core ML export requires macOS"},
    }


class _Tree(HTMLParser):
    """Every start tag as (tag, attrs, enclosing section id), and the text of each section."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str], str | None]] = []
        self.text: dict[str | None, list[str]] = {}
        self.section: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "section":
            self.section = a.get("id")
        self.elements.append((tag, a, self.section))

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self.section = None

    def handle_data(self, data: str) -> None:
        self.text.setdefault(self.section, []).append(data)

    def find(self, tag: str, section: str | None = None, cls: str | None = None) -> list[dict[str, str]]:
        return [a for t, a, s in self.elements if t == tag and (section is None or s == section)
                and (cls is None or cls in a.get("class", "").split())]

    def section_text(self, sid: str) -> str:
        return " ".join(self.text.get(sid, []))


def parse(doc: str) -> _Tree:
    tree = _Tree()
    tree.feed(doc)
    return tree


def _section_html(doc: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', doc, re.S)
    assert m, f"no section {sid}"
    return m.group(1)


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    return realistic_report_data()


@pytest.fixture(scope="module")
def doc(data: dict[str, Any]) -> str:
    return render_run_report(data)


def test_document_skeleton_and_all_sections(doc: str, data: dict[str, Any]) -> None:
    assert doc.startswith("<!DOCTYPE html>")
    assert '<meta charset="utf-8">' in doc
    assert "<title>SnapGen end-to-end run · toy-cpu</title>" in doc
    tree = parse(doc)
    ids = [a["id"] for a in tree.find("section")]
    assert ids == ["metrics", "summary", "stages", "curves", "eval", "images", "exports", "lineage", "links"]
    # header meta and table of contents
    for v in (data["preset"], data["run_id"], data["flow_run_id"], data["created"], data["subtitle"]):
        assert v in doc
    assert '<time datetime="2025-06-01T12:34:56+00:00">2025-06-01 12:34:56 UTC</time>' in doc
    assert [a["href"] for a in tree.find("a") if a["href"].startswith("#")] == [f"#{i}" for i in ids]
    # notes callout
    assert 'id="notes"' in doc and "CPU demo proves mechanics; quality needs toy-gpu" in doc


def test_no_script_and_no_external_resources(doc: str) -> None:
    assert "<script" not in doc.lower()
    tree = parse(doc)
    for tag, attrs, _ in tree.elements:
        for attr in ("src", "href"):
            if attr in attrs and tag != "a":
                assert attrs[attr].startswith(("data:", "#")), (tag, attrs[attr][:60])
    # every http(s) reference is an anchor in the links section
    outside = doc.replace(_section_html(doc, "links"), "")
    assert not re.search(r"https?://", outside), re.findall(r".{30}https?://.{30}", outside)
    links = tree.find("a", section="links")
    assert [a["href"] for a in links] == [
        "http://127.0.0.1:5000/#/experiments/1/runs/9f1c2ab37e4d4c0a8b1e2f3a4b5c6d7e",
        "http://127.0.0.1:4200/runs/flow-run/6a0d3b2e-1c4f-4e7a-9b8c-0d1e2f3a4b5c"]
    assert "Content-Security-Policy" in doc and "default-src 'none'" in doc


def test_summary_table_cells(doc: str, data: dict[str, Any]) -> None:
    html_ = _section_html(doc, "summary")
    tree = parse(doc)
    heads = re.findall(r'<th scope="col"[^>]*>(.*?)</th>', html_)
    assert heads == data["summary"]["columns"]
    assert '<th scope="col">model</th>' in html_ and '<th scope="col" class="num">GenEval</th>' in html_
    rows = re.findall(r"<tr>(.*?)</tr>", html_.split("<tbody>")[1])
    assert len(rows) == 4
    text = tree.section_text("summary")
    for name in MODELS:
        assert name in text
    assert "0.512" in text and "0.51234" not in text          # 3 significant digits
    assert "187" in text and "187.234" not in text
    assert "86\u2009000\u2009000" in text                       # ints grouped, not rounded
    assert rows[3].count('<td class="num none">—</td>') == 3    # None -> em dash, aligned as a number


@pytest.mark.parametrize("value, text", [(None, "—"), (0.51234, "0.512"), (12.345, "12.3"), (1234.5, "1234"),
                                         (0.0012345, "0.00123"), (3.1e-5, "3.10e-05"), (0.0, "0"), (7, "7"),
                                         (float("nan"), "nan"), (True, "yes")])
def test_format_number(value: Any, text: str) -> None:
    assert format_number(value) == text


def test_format_bytes_and_seconds() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(1_843_200) == "1.76 MiB"
    assert format_bytes(None) == "—"
    assert format_seconds(0.42) == "0.420 s"
    assert format_seconds(75) == "1 m 15 s"
    assert format_seconds(3725) == "1 h 02 m"


def test_escaping_everywhere() -> None:
    evil = '<script>alert("x")</script>'
    data = {"title": evil, "subtitle": evil, "preset": evil, "run_id": evil, "notes": [evil],
            "summary": {"columns": [evil, "v"], "rows": [[evil, 1.0], ["ok", evil]]},
            "key_metrics": {evil: 1.0},
            "stages": [{"name": evil, "seconds": 1.0, "status": evil, "cache_hit": False,
                        "mlflow_run_id": evil, "detail": evil}],
            "curves": {evil: {evil: [[0, 1.0], [1, 2.0]]}},
            "eval_bars": {evil: {"categories": [evil], "series": {evil: [0.5]}}},
            "images": [{"title": evil, "path": "/nonexistent/" + evil, "caption": evil}],
            "exports": [{"part": evil, "format": evil, "bytes": 10, "params": 1, "parity": 0.0,
                         "passed": True, "path": evil}],
            "lineage": {evil: evil},
            "links": {evil: 'javascript:alert("x")', "ok": 'http://h/"><script>alert(1)</script>'},
            "missing": {"images2": evil}}
    doc = render_run_report(data)
    assert "<script" not in doc.lower()
    assert "javascript:" not in [a.get("href", "")[:11] for a in parse(doc).find("a")]
    assert 'href="javascript' not in doc
    escaped = "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;"
    assert doc.count(escaped) >= 20
    assert f"<title>{escaped}</title>" in doc
    assert f'<th scope="col">{escaped}</th>' in doc


def test_missing_sections_show_reason_or_are_omitted() -> None:
    doc = render_run_report({"title": "t", "curves": {}, "images": [],
                             "summary": {"columns": ["model"], "rows": []},
                             "missing": {"eval": "DPG-Bench questions not downloaded (offline)",
                                         "images": "no sample grids: the generate stage failed",
                                         "summary": "evaluation skipped", "teacher": "no teacher checkpoint"}})
    tree = parse(doc)
    assert [a["id"] for a in tree.find("section")] == ["summary", "eval", "images"]
    assert "not available: DPG-Bench questions not downloaded (offline)" in tree.section_text("eval")
    assert "not available: no sample grids: the generate stage failed" in tree.section_text("images")
    assert "not available: evaluation skipped" in tree.section_text("summary")
    assert "not available: teacher: no teacher checkpoint" in doc      # unknown key -> callout
    assert "<svg" not in doc and "<img" not in doc and "<table" not in doc
    for sid in ("curves", "stages", "exports", "lineage", "links"):
        assert f'id="{sid}"' not in doc


def test_present_section_with_reason_keeps_data_and_adds_note(doc: str) -> None:
    html_ = _section_html(doc, "exports")
    assert "note: Core ML export requires macOS" in html_
    assert "not available" not in html_
    assert "<table" in html_


def test_empty_data_renders_a_valid_document() -> None:
    doc = render_run_report({})
    assert "<title>SnapGen run report</title>" in doc and "<section" not in doc and doc.rstrip().endswith("</html>")


def test_stages_table_and_duration_bars(doc: str, data: dict[str, Any]) -> None:
    tree = parse(doc)
    bars = tree.find("rect", section="stages", cls="bar")
    assert len(bars) == len(data["stages"])
    widths = [float(b["width"]) for b in bars]
    secs = [s["seconds"] for s in data["stages"]]
    assert widths.index(max(widths)) == secs.index(max(secs))             # longest bar = slowest stage
    assert widths[1] < 2                                                  # the 0.42 s cached stage
    assert [b["data-status"] for b in bars] == [s["status"] for s in data["stages"]]
    assert len({b["fill"] for b in bars}) == 3                           # completed / cached / failed
    text = tree.section_text("stages")
    assert "21 m 24 s" in text and "0.420 s" in text and "coreml: requires macOS" in text
    assert "46 m 02 s" in text                                            # total
    assert text.count("hit") == 1 and text.count("miss") == 5


def test_curves_one_chart_per_panel_non_finite_skipped(doc: str, data: dict[str, Any]) -> None:
    tree = parse(doc)
    charts = tree.find("svg", section="curves")
    assert len(charts) == 3 and all("chart-line" in c["class"] for c in charts)
    lines = tree.find("polyline", section="curves")
    by_series = {p["data-series"]: p["points"].split() for p in lines}
    assert set(by_series) == {"train/loss", "val/loss", "kd/output", "kd/feature", "lr"}
    assert len(by_series["train/loss"]) == 61
    assert len(by_series["val/loss"]) == 7
    assert len(by_series["kd/output"]) == 3 and len(by_series["kd/feature"]) == 3   # nan / inf dropped
    for pts in by_series.values():
        for xy in pts:
            x, y = map(float, xy.split(","))
            assert math.isfinite(x) and math.isfinite(y) and 0 <= x <= 600 and 0 <= y <= 300
    markers = tree.find("circle", section="curves")
    assert [m["data-series"] for m in markers] == ["adv/generator"]     # single point -> marker
    assert "nan" not in " ".join(p["points"] for p in lines).lower()
    # axes: ticks with labels, the log panel labelled by decades
    section = _section_html(doc, "curves")
    assert section.count('class="tick"') >= 20 and ">step</text>" in section
    log_chart = section.split("<figcaption>learning rate")[1]
    assert "value (log scale)" in log_chart
    assert all(f">{t}<" in log_chart for t in ("1e-6", "1e-5", "1e-4"))
    # train/loss falls: SVG y grows downwards, so the first point sits higher than the last
    first, last = (float(by_series["train/loss"][i].split(",")[1]) for i in (0, -1))
    assert first < last


def test_tick_labels_are_clean_decimals() -> None:
    doc = render_run_report({"curves": {"p": {"a": [[2.7, 1.0], [3.3, 2.0]]}}})
    ticks = re.findall(r'class="tick"[^>]*>([^<]*)<', doc)
    assert {"2.7", "3.0", "3.3", "1.0", "2.0"} <= set(ticks), ticks
    assert all(len(t.split(".")[-1]) <= 1 for t in ticks if "." in t), ticks


def test_curve_panel_with_no_finite_values_is_a_note() -> None:
    doc = render_run_report({"curves": {"broken": {"a": [[0, float("nan")], [1, float("inf")]]},
                                        "ok": {"a": [[0, 1.0], [1, 0.5]]}}})
    assert "broken: no finite values" in doc
    assert doc.count("<svg") == 1 and doc.count("<polyline") == 1


def test_eval_bars_count_and_heights(doc: str, data: dict[str, Any]) -> None:
    tree = parse(doc)
    charts = tree.find("svg", section="eval")
    assert len(charts) == 2
    bars = tree.find("rect", section="eval", cls="bar")
    expected = sum(v is not None for b in data["eval_bars"].values() for vs in b["series"].values() for v in vs)
    assert len(bars) == expected == 6 * 3 - 1 + 5 * 3
    # heights proportional to value on a 0..1 axis
    teacher = [b for b in bars if b["data-model"] == "teacher" and b["data-category"] == "single_object"][0]
    pos = [b for b in bars if b["data-model"] == "teacher" and b["data-category"] == "position"][0]
    assert float(teacher["height"]) / float(pos["height"]) == pytest.approx(0.98 / 0.12, rel=0.02)
    section = _section_html(doc, "eval")
    assert ">0.98<" in section and ">0.12<" in section                  # value labels
    assert section.count(">n/a<") == 1                                   # the None value
    assert section.count('class="legend"') == 2


def test_eval_axis_grows_past_one() -> None:
    doc = render_run_report({"eval_bars": {"FID": {"categories": ["all"], "series": {"a": [150.0], "b": [75.0]}}}})
    tree = parse(doc)
    bars = {b["data-model"]: float(b["height"]) for b in tree.find("rect", cls="bar")}
    assert bars["a"] / bars["b"] == pytest.approx(2.0, rel=0.02)
    assert ">150<" in doc or ">160<" in doc


def test_same_model_same_colour_across_charts(doc: str) -> None:
    tree = parse(doc)
    colours: dict[str, set[str]] = {}
    for b in tree.find("rect", section="eval", cls="bar"):
        colours.setdefault(b["data-model"], set()).add(b["fill"])
    assert all(len(c) == 1 for c in colours.values()), colours
    assert len({next(iter(c)) for c in colours.values()}) == len(colours)   # distinct models, distinct colours
    # summary rows of charted models carry the same swatch colour
    summary = _section_html(doc, "summary")
    teacher_colour = next(iter(colours["teacher"]))
    assert f'background:{teacher_colour}"></span>teacher' in summary


def test_images_embedded_as_decodable_data_uris(data: dict[str, Any], doc: str) -> None:
    tree = parse(doc)
    imgs = tree.find("img", section="images")
    assert len(imgs) == 3
    for img, item in zip(imgs, data["images"]):
        m = re.fullmatch(r"data:image/png;base64,([A-Za-z0-9+/=]+)", img["src"])
        assert m, img["src"][:40]
        assert base64.b64decode(m.group(1)) == item["png"]
        w, h = Image.open(io.BytesIO(item["png"])).size
        assert img["data-natural-size"] == f"{w}x{h}"
        assert int(img["width"]) * h == int(img["height"]) * w and int(img["width"]) >= w
        assert img["alt"] == item["title"]
    assert "8 GenEval prompts × 4 seeds" in tree.section_text("images")


def test_images_from_files_missing_and_unreadable(tmp_path: Path) -> None:
    good = tmp_path / "grid.png"
    raw = png_bytes(3)
    good.write_bytes(raw)
    jpg = io.BytesIO()
    Image.open(io.BytesIO(raw)).convert("RGB").save(jpg, format="JPEG")
    doc = render_run_report({"images": [
        {"title": "ok", "path": str(good)},
        {"title": "jpeg", "png": jpg.getvalue()},
        {"title": "gone", "path": str(tmp_path / "nope.png")},
        {"title": "junk", "png": b"not an image"}]})
    tree = parse(doc)
    srcs = [a["src"] for a in tree.find("img")]
    assert len(srcs) == 2
    assert base64.b64decode(srcs[0].split(",", 1)[1]) == raw
    assert srcs[1].startswith("data:image/jpeg;base64,")
    assert f"image missing: {tmp_path / 'nope.png'}" in doc
    assert "image unreadable: 12 bytes" in doc


def test_exports_table_human_sizes(doc: str) -> None:
    html_ = _section_html(doc, "exports")
    rows = re.findall(r"<tr>(.*?)</tr>", html_.split("<tbody>")[1])
    assert len(rows) == 3
    assert "1.76 MiB" in rows[0] and "380 k" in rows[0] and "3.10e-05" in rows[0] and "✓ pass" in rows[0]
    assert "402 KiB" in rows[1] and 'title="412,160 bytes"' in rows[1]
    assert "coreml" in rows[2] and rows[2].count("—") == 5
    assert "* 1.000)" in rows[0] and "* 0.224)" in rows[1] and "sizebar" not in rows[2]


def test_lineage_and_links(doc: str, data: dict[str, Any]) -> None:
    text = parse(doc).section_text("lineage")
    for k, v in data["lineage"].items():
        assert k in text
    assert "sha256:5e3b9c0d1f" in text and '["aa11bb22cc33dd44", "ee55ff66aa77bb88"]' in text
    assert "MLflow run" in parse(doc).section_text("links")


def test_long_curve_is_decimated_but_keeps_spikes() -> None:
    n = 20_000
    vals = np.full(n, 0.5)
    vals[12_345] = 5.0
    doc = render_run_report({"curves": {"p": {"s": [[i, float(v)] for i, v in enumerate(vals)]}}})
    pts = re.search(r'points="([^"]+)"', doc).group(1).split()
    assert len(pts) <= 1501
    ys = [float(p.split(",")[1]) for p in pts]
    assert min(ys) < 30                                                    # the spike reaches the top
    assert len(doc) < 200_000


def test_write_run_report_is_atomic(tmp_path: Path, data: dict[str, Any],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "sub" / "report.html"
    out = write_run_report(data, target)
    assert out == target and target.read_text(encoding="utf-8") == render_run_report(data)
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.html"]
    # overwrite in place
    write_run_report({"title": "second"}, target)
    assert "<title>second</title>" in target.read_text(encoding="utf-8")
    assert os.stat(target).st_mode & 0o777 == 0o644
    # the rename fails: the old report stays whole and the temp file is removed
    seen: list[str] = []

    def failing_replace(src: str, dst: Any) -> None:
        seen.append(Path(src).name)
        assert Path(src).parent == target.parent and Path(src).read_text(encoding="utf-8").startswith("<!DOCTYPE")
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_run_report({"title": "third"}, target)
    assert seen and seen[0].startswith(".report.html.") and seen[0].endswith(".tmp")
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.html"]
    assert "<title>second</title>" in target.read_text(encoding="utf-8")
