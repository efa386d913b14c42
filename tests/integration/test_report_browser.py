"""The HTML run report in a real headless browser (Debian's chromium via playwright): it renders with
no console errors, warnings or failed requests, every image decodes, every SVG chart draws, and a
screenshot of it is a real picture."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from reporting.html import write_run_report
from tests.unit.test_report_html import MODELS, realistic_report_data

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is absent (make test installs Debian's chromium)", allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402

pytestmark = pytest.mark.integration

LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def browser() -> Any:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            yield b
        finally:
            b.close()


def _open(browser: Any, path: Path, width: int = 1200) -> tuple[Any, list[str]]:
    """A page on file://path with every console error/warning, page error and failed request collected."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
            if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"requestfailed: {r.url} {r.failure}"))
    page.goto(path.as_uri(), wait_until="load")
    page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=10_000)
    return page, problems


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("report")
    data = realistic_report_data(folder)                     # sample grids as real PNG files
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, (300, 900, 3), dtype=np.uint8))
    big.save(folder / "wide.jpg", format="JPEG", quality=85)
    data["images"].append({"title": "wide JPEG", "path": str(folder / "wide.jpg"), "caption": "900×300"})
    return write_run_report(data, folder / "report.html"), data


def test_report_renders_cleanly_in_chromium(browser: Any, report: tuple[Path, dict[str, Any]],
                                           tmp_path: Path) -> None:
    path, data = report
    page, problems = _open(browser, path)
    try:
        assert page.title() == data["title"]
        # every section the data fills is there and visible
        for sid in ("metrics", "summary", "stages", "curves", "eval", "images", "exports", "lineage", "links"):
            box = page.locator(f"section#{sid}").bounding_box()
            assert box and box["width"] > 600 and box["height"] > 40, (sid, box)

        imgs = page.evaluate("""Array.from(document.images).map(i => ({complete: i.complete,
            w: i.naturalWidth, h: i.naturalHeight, shown: i.getBoundingClientRect().width,
            src: i.currentSrc.slice(0, 22)}))""")
        assert len(imgs) == len(data["images"]) == 4
        for img in imgs:
            assert img["complete"] and img["w"] > 0 and img["h"] > 0 and img["shown"] > 0, img
            assert img["src"].startswith("data:image/"), img
        assert [(i["w"], i["h"]) for i in imgs] == [(128, 96), (96, 64), (96, 64), (900, 300)]
        # decoded whole: the browser's mean colour of each picture matches PIL's reading of the file
        # (a truncated PNG still has its natural size but leaves the missing rows transparent)
        means = page.evaluate("""Array.from(document.images).map(i => {
            const c = document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight;
            const g = c.getContext('2d'); g.drawImage(i, 0, 0);
            const d = g.getImageData(0, 0, c.width, c.height).data; const m = [0, 0, 0, 0];
            for (let k = 0; k < d.length; k += 4) for (let j = 0; j < 4; j++) m[j] += d[k + j];
            return m.map(v => v / (d.length / 4));
        })""")
        for mean, item in zip(means, data["images"]):
            with Image.open(item["path"]) as src:
                expected = np.asarray(src.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0)
            assert mean[3] == 255, (item["title"], mean)
            assert np.allclose(mean[:3], expected, atol=2.0), (item["title"], mean, expected)

        charts = page.evaluate("""Array.from(document.querySelectorAll('svg.chart')).map(s => {
            const r = s.getBoundingClientRect();
            const drawn = Array.from(s.querySelectorAll('polyline, path, rect, circle'))
                .filter(e => { const b = e.getBBox(); return b.width > 0 || b.height > 0; });
            return {cls: s.getAttribute('class'), w: r.width, h: r.height, drawn: drawn.length,
                    section: s.closest('section').id};
        })""")
        assert [c["section"] for c in charts] == ["stages"] + ["curves"] * 3 + ["eval"] * 2
        for c in charts:
            assert c["w"] > 300 and c["h"] > 150 and c["drawn"] > 0, c
        assert [c["drawn"] for c in charts if c["section"] == "eval"] == [17, 15]
        assert charts[0]["drawn"] == len(data["stages"])
        # nothing overflows the 1200 px viewport sideways
        assert page.evaluate("document.documentElement.scrollWidth") <= 1200

        summary = page.locator("section#summary table").inner_text()
        for name in MODELS:
            assert name in summary
        assert "0.512" in summary and "—" in summary
        assert "1.76 MiB" in page.locator("section#exports").inner_text()
        assert "not available" not in page.locator("main").inner_text()

        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
    finally:
        page.close()
    assert not problems, problems
    assert shot.stat().st_size > 50_000
    with Image.open(shot) as im:
        assert im.width == 1200 and im.height > 2000
        small = np.asarray(im.convert("RGB").resize((120, im.height // 10)))
    assert len(np.unique(small.reshape(-1, 3), axis=0)) > 200        # a real picture, not one colour
    assert small.std() > 20


def test_sparse_report_with_gaps_renders_cleanly(browser: Any, tmp_path: Path) -> None:
    """A failed run: most sections missing with reasons, a missing image file, a broken curve."""
    data = {"title": "SnapGen run <failed>", "notes": ["pretrain failed: CUDA out of memory"],
            "stages": [{"name": "bootstrap", "seconds": 10.0, "status": "completed", "cache_hit": True,
                        "mlflow_run_id": None, "detail": ""},
                       {"name": "pretrain", "seconds": 3.5, "status": "failed", "cache_hit": False,
                        "mlflow_run_id": "abc", "detail": "OOM"}],
            "curves": {"pretrain loss": {"train/loss": [[0, 1.0], [1, float("nan")]]}},
            "images": [{"title": "grid", "path": str(tmp_path / "never_written.png")}],
            "missing": {"summary": "evaluation did not run", "eval": "evaluation did not run",
                        "exports": "no exported model"}}
    path = write_run_report(data, tmp_path / "r.html")
    page, problems = _open(browser, path, width=900)
    try:
        text = page.locator("main").inner_text()
        assert page.title() == "SnapGen run <failed>"
        assert "not available: evaluation did not run" in text and "not available: no exported model" in text
        assert f"image missing: {tmp_path / 'never_written.png'}" in text
        assert page.evaluate("document.images.length") == 0
        markers = page.evaluate("document.querySelectorAll('section#curves svg circle').length")
        assert markers == 1
        buf = page.screenshot(full_page=True)
    finally:
        page.close()
    assert not problems, problems
    with Image.open(io.BytesIO(buf)) as im:
        assert im.width == 900 and len(im.convert("RGB").getcolors(1 << 20) or ()) > 50


def dashboard_data(folder: Path) -> dict[str, Any]:
    """The dashboard parts of a pipeline report, built by flows.pipeline_report from a realistic summary:
    model cards against floor and ceiling, the champion comparison, captioned samples with pass/fail marks
    read from a results.jsonl, teacher/AE curves and the distillation losses on separate panels, run links."""
    import json

    from flows.pipeline_report import _curve_panels, champion_comparison, gallery, model_cards

    rng = np.random.default_rng(1)
    rows = []
    for i, (tag, prompt) in enumerate((("position", "a red circle left of a blue square"),
                                       ("counting", "three green triangles"), ("colors", "a yellow square"))):
        path = folder / f"{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        rows.append({"filename": str(path), "tag": tag, "prompt": prompt, "correct": i != 1,
                     "reason": "" if i != 1 else "expected triangle>=3, found 2"})
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ref = {"floor": {"geneval": {"overall": 0.1, "exact_count": {"overall": 0.05}}, "dpg": {"overall": 0.3}},
           "ae": {"geneval": {"overall": 0.8, "exact_count": {"overall": 0.7}}, "dpg": {"overall": 0.9}}}
    bench = lambda g, d, f: {"geneval": {"overall": g, "exact_count": {"overall": g / 2}}, "dpg": {"overall": d},  # noqa: E731
                             "fid": {"fid": f}}
    summary = {"preset": "toy", "mlflow_run_id": "r0", "flow_run_id": "f0", "stages": [],
               "config": {"promotion": {"gates": [{"metric": "geneval/overall", "higher_is_better": True}],
                                        "demo_thresholds": True}},
               "results": {"evaluate": {"models": {
                   "teacher": {"benchmarks": bench(0.45, 0.6, 120.0), "reference_rows": ref, "folders": {"s": str(folder)},
                               "generation": {"sampler": {"steps": 28}}},
                   "distilled": {"benchmarks": bench(0.05, 0.35, 210.0), "folders": {"s": str(folder)},
                                 "generation": {"sampler": {"steps": 4}}}}},
                   "register": {"name": "snapgen", "version": "2", "metrics": {"geneval/overall": 0.05, "fid": 210.0}},
                   "promote": {"passed": False, "promoted": False, "champion_before": None,
                               "reasons": ["geneval/overall >= 0.3: 0.05"]}}}
    steps = list(range(0, 200, 10))
    hist = {"autoencoder/l1": [(s, 0.3 * np.exp(-s / 80) + 0.02) for s in steps],
            "autoencoder/kl": [(s, 40.0 * np.exp(-s / 60) + 1) for s in steps],
            "teacher/loss": [(s, 1.5 - s / 400) for s in steps]}
    distill = {"loss/g": [(s, 2.0 - s / 200) for s in steps], "loss/kd": [(s, 0.01 + 0.001 * (s % 3)) for s in steps],
               "loss/d": [(s, 1.3) for s in steps], "d/acc_real": [(s, 0.5 + s / 500) for s in steps]}
    curves = _curve_panels("teacher", hist) | _curve_panels("distill_steps", distill)
    return {"title": "snapgen pipeline: toy", "run_id": "r0", "flow_run_id": "f0",
            "model_cards": model_cards(summary), "champion": champion_comparison(summary),
            "gallery": gallery(summary), "curves": curves, "curves_log_y": ["teacher: AE"],
            "run_links": [{"name": "pipeline toy", "mlflow_run_id": "r0", "mlflow": "http://127.0.0.1:5000/#/experiments/1/runs/r0",
                           "flow_run_id": "f0", "prefect": "http://127.0.0.1:4200/runs/flow-run/f0"},
                          {"name": "curate (cached)", "mlflow_run_id": "r1", "mlflow": None, "flow_run_id": None,
                           "prefect": None}]}


def test_dashboard_parts_render_in_chromium(browser: Any, tmp_path: Path) -> None:
    data = dashboard_data(tmp_path)
    path = write_run_report(data, tmp_path / "dashboard.html")
    page, problems = _open(browser, path)
    try:
        for sid in ("models", "champion", "curves", "gallery", "runs"):
            box = page.locator(f"section#{sid}").bounding_box()
            assert box and box["width"] > 600 and box["height"] > 40, (sid, box)
        # a card per model, each metric's bar drawn to its value on an axis holding floor and ceiling
        cards = page.locator("section#models .model-card")
        assert cards.count() == 2
        teacher = cards.nth(0).inner_text()
        assert "teacher (toy SD3)" in teacher and "0.450" in teacher and "floor 0.100" in teacher
        assert "ceiling 0.800" in teacher and "50% of the way from floor to ceiling" in teacher
        assert "below the floor" in cards.nth(1).inner_text()
        widths = page.evaluate("""Array.from(document.querySelectorAll('section#models .gauge')).map(g =>
            g.querySelector('.gauge-fill').getBoundingClientRect().width / g.getBoundingClientRect().width)""")
        assert widths[0] == pytest.approx(0.45, abs=0.02) and widths[3] == pytest.approx(0.05, abs=0.02), widths
        # the comparison with the previous champion (none yet: said so) and the gate that failed
        champion = page.locator("section#champion").inner_text()
        assert "not promoted" in champion and "geneval/overall >= 0.3" in champion
        assert "no previous champion" in champion
        # captions in HTML under each sample with its pass/fail mark from results.jsonl
        figures = page.evaluate("""Array.from(document.querySelectorAll('section#gallery figure.sample')).map(f => ({
            cls: f.className, caption: f.querySelector('figcaption').innerText,
            below: f.querySelector('figcaption').getBoundingClientRect().top >= f.querySelector('img').getBoundingClientRect().bottom - 1,
            w: f.querySelector('img').naturalWidth}))""")
        assert len(figures) == 6 and all(f["below"] and f["w"] == 32 for f in figures), figures
        assert "a red circle left of a blue square" in figures[0]["caption"] and "pass" in figures[0]["caption"]
        assert [f["cls"].split()[-1] for f in figures[:3]] == ["pass", "fail", "pass"]
        assert "found 2" in figures[1]["caption"]
        assert "2 of 3 pass" in page.locator("section#gallery").inner_text()
        # teacher/AE curves and each distillation loss on its own panel (own axis)
        titles = page.evaluate("Array.from(document.querySelectorAll('section#curves figcaption')).map(c => c.innerText)")
        assert [t for t in titles if t.startswith("teacher")] == ["teacher: AE (log y)", "teacher: denoiser"], titles
        assert {"distill: loss/g", "distill: loss/kd", "distill: loss/d", "distill: discriminator accuracy"} <= set(titles)
        # links to the MLflow and Prefect runs; a run without a known UI is shown, not linked
        hrefs = page.evaluate("Array.from(document.querySelectorAll('section#runs a')).map(a => a.href)")
        assert hrefs == ["http://127.0.0.1:5000/#/experiments/1/runs/r0", "http://127.0.0.1:4200/runs/flow-run/f0"]
        assert "curate (cached)" in page.locator("section#runs").inner_text()
        assert page.evaluate("document.documentElement.scrollWidth") <= 1200
        shot = Path(os.environ.get("SNAPGEN_REPORT_SHOT_DIR", str(tmp_path))) / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
    finally:
        page.close()
    assert not problems, problems
    with Image.open(shot) as im:
        assert im.width == 1200 and im.height > 1200
        assert len(np.unique(np.asarray(im.convert("RGB").resize((120, im.height // 10))).reshape(-1, 3), axis=0)) > 200
