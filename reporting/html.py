"""The self-contained HTML run report of an end-to-end pipeline run (one file, logged to MLflow).

``render_run_report(data)`` returns a whole HTML document; ``write_run_report(data, path)`` writes
it atomically. The document loads nothing: CSS sits in one ``<style>``, charts are inline SVG drawn
here (no matplotlib), images are base64 ``data:`` URIs, there is no JavaScript, and a
Content-Security-Policy ``<meta>`` forbids any fetch but ``data:`` images, so the file reads the
same from an MLflow artifact view, a browser's file:// or an e-mail attachment.

``data`` (every key optional)::

    title, subtitle, created, preset, run_id, flow_run_id      str
    notes        [str]                                      a callout under the header
    key_metrics  {name: float}                              cards
    summary      {"columns": [str], "rows": [[cell, ...]]}  None -> "—", floats to 3 significant digits
    stages       [{"name", "seconds", "status", "cache_hit", "mlflow_run_id", "detail"}]
                                                            table + horizontal SVG bar chart
    curves       {panel: {series: [[step, value], ...]}}    one SVG line chart per panel;
    curves_log_y [panel]                                    log-scale y for those panels
    eval_bars    {benchmark: {"categories": [str], "series": {model: [float | None, ...]}}}
                                                            grouped SVG bar chart per benchmark
    images       [{"title", "path" | "png": bytes, "caption"}]   embedded as data URIs
    exports      [{"part", "format", "bytes", "params", "parity", "passed", "path"}]
    lineage      {key: value}                               definition table
    links        {label: url}                               the only anchors to other documents
    model_cards  [{"model", "subtitle", "metrics": [{"name", "value", "floor", "ceiling",
                   "higher_is_better"}]}]                   one card per model, each metric on a bar
                                                            against its floor and ceiling
    champion     {"candidate", "champion", "verdict", "passed", "reasons": [str], "note",
                  "rows": [{"metric", "candidate", "champion", "higher_is_better"}]}
                                                            this run's model beside the previous champion
    gallery      [{"model", "caption", "items": [{"path" | "png", "prompt", "passed", "reason",
                   "detail"}]}]                             samples with their prompt as HTML text and a
                                                            pass/fail mark (results.jsonl)
    run_links    [{"name", "mlflow_run_id", "mlflow", "flow_run_id", "prefect"}]
                                                            MLflow and Prefect runs, linked when a UI is known
    missing      {section: reason}                          "not available: <reason>" for an absent
                                                            section (with data present: a note)

Section ids: ``models champion summary stages curves eval gallery images exports lineage runs`` (and
``notes metrics links``).
A name (model or series) gets one colour for the whole report, in the order first seen across
eval_bars, then curves. Non-finite curve values (and non-positive ones on a log axis) are skipped.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from PIL import Image

__all__ = ["render_run_report", "write_run_report", "format_number", "format_bytes", "format_count",
           "format_seconds"]

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
           "#b07aa1", "#9c755f", "#ff9da7", "#7f7f7f", "#d4a21a")
STATUS_COLOURS = {"completed": "#59a14f", "cached": "#76b7b2", "failed": "#e15759",
                  "skipped": "#bab0ac", "running": "#edc948"}
OTHER_STATUS_COLOUR = "#9c755f"
# data key -> (section id, heading); the document order.
SECTIONS: dict[str, tuple[str, str]] = {
    "key_metrics": ("metrics", "Key metrics"),
    "model_cards": ("models", "Models against floor and ceiling"),
    "champion": ("champion", "Against the previous champion"),
    "summary": ("summary", "Summary"),
    "stages": ("stages", "Stages"),
    "curves": ("curves", "Training curves"),
    "eval_bars": ("eval", "Evaluation"),
    "gallery": ("gallery", "Samples with their prompts"),
    "images": ("images", "Samples"),
    "exports": ("exports", "Exports"),
    "lineage": ("lineage", "Lineage"),
    "run_links": ("runs", "MLflow and Prefect runs"),
    "links": ("links", "Links"),
}
_ALIASES = {"eval": "eval_bars", "metrics": "key_metrics", "samples": "images", "models": "model_cards",
            "runs": "run_links"}
_LINK_SCHEMES = ("http://", "https://", "file://", "mailto:")
_MAX_POINTS = 1500          # per curve series, after min/max decimation
_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        "base-uri 'none'; form-action 'none'")


# ----------------------------------------------------------------------------------------------
# formatting
# ----------------------------------------------------------------------------------------------

def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _finite(x: Any) -> float | None:
    """float(x) when it is a finite real number (bools excluded), else None."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def format_number(x: Any) -> str:
    """None -> "—"; floats to 3 significant digits without exponent in [1e-3, 1e6) (1234.5 -> "1234",
    0.45678 -> "0.457", 12.345 -> "12.3"), otherwise "1.23e-05"; ints with thin grouping; bools yes/no."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int) or (hasattr(x, "dtype") and getattr(x.dtype, "kind", "") in "iu"):
        return f"{int(x):,}".replace(",", "\u2009")
    try:
        f = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(f):
        return "nan" if math.isnan(f) else ("∞" if f > 0 else "−∞")
    if f == 0:
        return "0"
    a = abs(f)
    if a < 1e-3 or a >= 1e6:
        return f"{f:.2e}"
    decimals = max(0, 2 - math.floor(math.log10(a)))
    return f"{f:.{decimals}f}"


def format_bytes(n: Any) -> str:
    """1536 -> "1.50 KiB" (binary units, 3 significant digits)."""
    v = _finite(n)
    if v is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(v)} B"
            return f"{format_number(v)} {unit}"
        v /= 1024
    return f"{v} TiB"  # pragma: no cover


def format_count(n: Any) -> str:
    """Parameter counts: 1234567 -> "1.23 M"."""
    v = _finite(n)
    if v is None:
        return "—"
    for div, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(v) >= div:
            text = format_number(v / div)
            return (text.rstrip("0").rstrip(".") if "." in text else text) + suffix
    return str(int(v))


def format_seconds(s: Any) -> str:
    """0.42 -> "0.42 s", 75 -> "1 m 15 s", 3725 -> "1 h 02 m"."""
    v = _finite(s)
    if v is None:
        return "—"
    if v < 60:
        return f"{format_number(v)} s"
    m, sec = divmod(int(round(v)), 60)
    if m < 60:
        return f"{m} m {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} m"


def _when(iso: Any) -> str:
    """ISO timestamp -> "2025-06-01 12:34:56 UTC" (the input unchanged when it does not parse)."""
    try:
        dt = datetime.fromisoformat(str(iso))
    except ValueError:
        return str(iso)
    off = dt.utcoffset()
    zone = "" if off is None else (" UTC" if not off else dt.strftime(" UTC%z"))
    return dt.strftime("%Y-%m-%d %H:%M:%S") + zone


def _truncate(text: str, n: int) -> str:
    return text if len(text) <= n else text[: max(1, n - 1)] + "…"


def _num(v: float) -> str:
    """SVG coordinate."""
    return f"{v:.2f}".rstrip("0").rstrip(".") if v == v else "0"


# ----------------------------------------------------------------------------------------------
# axes
# ----------------------------------------------------------------------------------------------

def _nice_step(span: float, target: int) -> float:
    raw = span / max(1, target)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= raw * (1 - 1e-9):
            return m * mag
    return 10 * mag  # pragma: no cover


def _linear_ticks(lo: float, hi: float, target: int = 5, expand: bool = True) -> tuple[float, float, list[float]]:
    """(lo', hi', ticks): nice ticks; with expand the domain grows to the outer ticks."""
    if hi < lo:
        lo, hi = hi, lo
    if hi - lo < 1e-12 * max(1.0, abs(lo), abs(hi)):
        pad = abs(lo) * 0.1 if lo else 1.0
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo, target)
    if expand:
        lo, hi = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    first = math.ceil(lo / step - 1e-9) * step
    ticks, k = [], 0
    while first + k * step <= hi + step * 1e-9 and k < 100:
        ticks.append(round(first + k * step, 12))
        k += 1
    return lo, hi, ticks


def _tick_label(v: float, step: float) -> str:
    step = float(f"{abs(step):.9g}") or 1.0          # 2.8 - 2.7 = 0.0999..96 must read as 0.1
    if abs(v) < step * 1e-9:
        return "0"
    if abs(step) >= 1000 and abs(v) >= 1000:
        for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(v) >= div:
                return _tick_label(v / div, step / div) + suffix
    if step < 1e-4:
        return f"{v:.1e}"
    mant = step / 10 ** math.floor(math.log10(step))
    decimals = max(0, -math.floor(math.log10(step)) + (1 if abs(mant - round(mant)) > 1e-6 else 0))
    return f"{v:.{decimals}f}"


def _log_ticks(lo: float, hi: float) -> tuple[float, float, list[float]]:
    dlo, dhi = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if dhi == dlo:
        dhi += 1
    every = max(1, math.ceil((dhi - dlo) / 6))
    ticks = [10.0 ** d for d in range(dlo, dhi + 1, every)]
    if dhi - dlo <= 1:
        ticks = sorted(set(ticks) | {m * 10.0 ** dlo for m in (2, 5)})
    return 10.0 ** dlo, 10.0 ** dhi, ticks


def _log_label(v: float) -> str:
    k = math.floor(math.log10(v) + 1e-9)
    return f"{v:g}" if -3 <= k <= 4 else f"{v / 10 ** k:g}e{k}"


# ----------------------------------------------------------------------------------------------
# colours
# ----------------------------------------------------------------------------------------------

class _Palette:
    """One colour per name for the whole report, in order of first use."""

    def __init__(self) -> None:
        self._colours: dict[str, str] = {}

    def __contains__(self, name: str) -> bool:
        return str(name) in self._colours

    def __call__(self, name: Any) -> str:
        key = str(name)
        if key not in self._colours:
            i = len(self._colours)
            if i < len(PALETTE):
                self._colours[key] = PALETTE[i]
            else:  # golden-angle hues past the fixed palette
                hue = (i * 137.508) % 360
                self._colours[key] = f"hsl({hue:.0f}, 55%, 45%)"
        return self._colours[key]


def _legend(names: Iterable[str], palette: _Palette) -> str:
    items = "".join(f'<span class="key"><span class="swatch" style="background:{palette(n)}"></span>'
                    f"{_esc(n)}</span>" for n in names)
    return f'<div class="legend">{items}</div>'


# ----------------------------------------------------------------------------------------------
# SVG charts
# ----------------------------------------------------------------------------------------------

def _svg_open(width: float, height: float, label: str, kind: str) -> str:
    return (f'<svg class="chart chart-{kind}" viewBox="0 0 {_num(width)} {_num(height)}" '
            f'width="{_num(width)}" height="{_num(height)}" role="img" aria-label="{_esc(label)}">')


def _seq(value: Any) -> list[Any]:
    """A list of a list, tuple, numpy array or other iterable; None -> []."""
    if value is None or isinstance(value, (str, bytes)):
        return []
    try:
        return list(value)
    except TypeError:                                # a lone scalar where a list belongs
        return []


def _points(raw: Any, log_y: bool) -> list[tuple[float, float]]:
    """[[step, value], ...] (or a plain list of values, or {step: value}) -> finite (x, y) pairs."""
    if isinstance(raw, Mapping):
        raw = list(raw.items())
    out = []
    for i, item in enumerate(_seq(raw)):
        if not isinstance(item, (str, bytes)) and hasattr(item, "__len__") and len(item) >= 2:
            x, y = _finite(item[0]), _finite(item[1])
        else:
            x, y = float(i), _finite(item)
        if x is None or y is None or (log_y and y <= 0):
            continue
        out.append((x, y))
    out.sort(key=lambda p: p[0])
    return out


def _decimate(pts: list[tuple[float, float]], limit: int = _MAX_POINTS) -> list[tuple[float, float]]:
    """Keep each bucket's min and max (in step order) so spikes survive long curves."""
    if len(pts) <= limit:
        return pts
    buckets = limit // 2
    size = len(pts) / buckets
    out: list[tuple[float, float]] = []
    for b in range(buckets):
        chunk = pts[int(b * size): int((b + 1) * size)] or pts[-1:]
        lo, hi = min(chunk, key=lambda p: p[1]), max(chunk, key=lambda p: p[1])
        out += sorted({lo, hi}, key=lambda p: p[0])
    if out[-1] != pts[-1]:
        out.append(pts[-1])
    return out


def line_chart_svg(title: str, series: Mapping[str, Any], palette: _Palette, log_y: bool = False) -> str:
    """One panel: a polyline per series with >= 2 finite points, a circle for a single point."""
    data = {str(name): _points(raw, log_y) for name, raw in series.items()}
    data = {k: v for k, v in data.items() if v}
    if not data:
        why = "no finite positive values for a log axis" if log_y else "no finite values"
        return f'<p class="na">{_esc(title)}: {why}</p>'
    W, H, L, R, T, B = 560.0, 290.0, 60.0, 16.0, 14.0, 42.0
    xs = [p[0] for v in data.values() for p in v]
    ys = [p[1] for v in data.values() for p in v]
    xlo, xhi, xticks = _linear_ticks(min(xs), max(xs), 6, expand=False)
    if log_y:
        ylo, yhi, yticks = _log_ticks(min(ys), max(ys))
        ty = lambda v: math.log10(v)  # noqa: E731
        ylabels = [_log_label(t) for t in yticks]
    else:
        ylo, yhi, yticks = _linear_ticks(min(ys), max(ys), 5)
        ty = lambda v: v  # noqa: E731
        ystep = yticks[1] - yticks[0] if len(yticks) > 1 else 1.0
        ylabels = [_tick_label(t, ystep) for t in yticks]
    xstep = xticks[1] - xticks[0] if len(xticks) > 1 else 1.0
    pw, ph = W - L - R, H - T - B
    px = lambda x: L + (x - xlo) / (xhi - xlo) * pw  # noqa: E731
    py = lambda y: T + ph - (ty(y) - ty(ylo)) / (ty(yhi) - ty(ylo)) * ph  # noqa: E731
    parts = [_svg_open(W, H, title, "line"), f"<title>{_esc(title)}</title>"]
    for t, lab in zip(yticks, ylabels):
        y = py(t)
        parts.append(f'<line class="grid" x1="{_num(L)}" x2="{_num(W - R)}" y1="{_num(y)}" y2="{_num(y)}"/>'
                     f'<text class="tick" x="{_num(L - 6)}" y="{_num(y + 3.5)}" text-anchor="end">{_esc(lab)}</text>')
    for t in xticks:
        x = px(t)
        parts.append(f'<line class="tickmark" x1="{_num(x)}" x2="{_num(x)}" y1="{_num(T + ph)}" y2="{_num(T + ph + 4)}"/>'
                     f'<text class="tick" x="{_num(x)}" y="{_num(T + ph + 16)}" text-anchor="middle">'
                     f"{_esc(_tick_label(t, xstep))}</text>")
    parts.append(f'<line class="axis" x1="{_num(L)}" x2="{_num(L)}" y1="{_num(T)}" y2="{_num(T + ph)}"/>'
                 f'<line class="axis" x1="{_num(L)}" x2="{_num(W - R)}" y1="{_num(T + ph)}" y2="{_num(T + ph)}"/>'
                 f'<text class="axis-label" x="{_num(L + pw / 2)}" y="{_num(H - 6)}" text-anchor="middle">step</text>'
                 f'<text class="axis-label" transform="translate(14 {_num(T + ph / 2)}) rotate(-90)" '
                 f'text-anchor="middle">{"value (log scale)" if log_y else "value"}</text>')
    for name, pts in data.items():
        colour = palette(name)
        last = pts[-1]
        tip = f"<title>{_esc(name)}: {len(pts)} points, last {_esc(format_number(last[1]))} at step {_esc(format_number(last[0]))}</title>"
        if len(pts) == 1:
            parts.append(f'<circle class="series marker" cx="{_num(px(last[0]))}" cy="{_num(py(last[1]))}" r="4" '
                         f'fill="{colour}" data-series="{_esc(name)}">{tip}</circle>')
            continue
        coords = " ".join(f"{_num(px(x))},{_num(py(y))}" for x, y in _decimate(pts))
        parts.append(f'<polyline class="series" points="{coords}" fill="none" stroke="{colour}" '
                     f'stroke-width="1.8" stroke-linejoin="round" data-series="{_esc(name)}">{tip}</polyline>')
    parts.append("</svg>")
    return "".join(parts)


def grouped_bars_svg(title: str, categories: Sequence[str], series: Mapping[str, Sequence[Any]],
                     palette: _Palette) -> str:
    """One rect.bar per (category, model) with a finite value; None/NaN -> a "n/a" mark."""
    cats = [str(c) for c in categories]
    models = [str(m) for m in series]
    values = {m: [(_finite(v[i]) if i < len(v) else None) for i in range(len(cats))]
              for m, v in ((str(k), _seq(v)) for k, v in series.items())}
    finite = [v for vs in values.values() for v in vs if v is not None]
    if not cats or not models:
        return f'<p class="na">{_esc(title)}: no categories or models</p>'
    vmax = max(finite, default=1.0)
    vmin = min(finite, default=0.0)
    if vmax <= 1.0 and vmin >= 0.0:
        ylo, yhi, yticks = 0.0, 1.0, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    else:
        ylo, yhi, yticks = _linear_ticks(min(0.0, vmin), max(0.0, vmax), 5)
    ystep = yticks[1] - yticks[0]
    bar_w = 16.0 if len(models) <= 4 else 12.0
    group_w = bar_w * len(models) + 18.0
    L, R = 44.0, 10.0
    W = max(560.0, L + R + group_w * len(cats))
    narrow = bar_w < 22
    longest = min(max(len(c) for c in cats), 22)            # labels are cut at 22 characters
    rotate_cats = longest * 6.8 > (W - L - R) / len(cats) - 4
    if rotate_cats:                                          # -35 degrees: room below, and left of the first
        label_px = longest * 6.8
        L = max(L, label_px * math.cos(math.radians(35)) - (W - L - R) / len(cats) / 2 + 8)
        W = max(W, L + R + group_w * len(cats))
    T = 34.0 if narrow else 20.0
    B = 28.0 + (longest * 6.8 * math.sin(math.radians(35)) if rotate_cats else 0.0)
    H = 290.0 + (B - 28.0)
    pw, ph = W - L - R, H - T - B
    gw = pw / len(cats)
    bw = min(bar_w, (gw - 10) / len(models))
    py = lambda y: T + ph - (y - ylo) / (yhi - ylo) * ph  # noqa: E731
    parts = [_svg_open(W, H, title, "bars"), f"<title>{_esc(title)}</title>"]
    for t in yticks:
        y = py(t)
        parts.append(f'<line class="grid" x1="{_num(L)}" x2="{_num(W - R)}" y1="{_num(y)}" y2="{_num(y)}"/>'
                     f'<text class="tick" x="{_num(L - 6)}" y="{_num(y + 3.5)}" text-anchor="end">'
                     f"{_esc(_tick_label(t, ystep))}</text>")
    zero = py(0.0)
    label_fmt = (lambda v: f"{v:.2f}") if yhi <= 1.0 and ylo >= 0 else format_number  # noqa: E731
    for ci, cat in enumerate(cats):
        g0 = L + ci * gw + (gw - bw * len(models)) / 2
        for mi, model in enumerate(models):
            v = values[model][ci]
            x = g0 + mi * bw
            cx = x + bw / 2
            if v is None:
                parts.append(f'<text class="na-mark" x="{_num(cx)}" y="{_num(zero - 3)}" text-anchor="middle">'
                             f"<title>{_esc(model)} · {_esc(cat)}: not available</title>n/a</text>")
                continue
            y0, y1 = sorted((py(v), zero))
            h = max(y1 - y0, 0.5)
            parts.append(f'<rect class="bar" x="{_num(x + 0.5)}" y="{_num(y0)}" width="{_num(bw - 1)}" height="{_num(h)}" '
                         f'fill="{palette(model)}" data-model="{_esc(model)}" data-category="{_esc(cat)}">'
                         f"<title>{_esc(model)} · {_esc(cat)}: {_esc(format_number(v))}</title></rect>")
            text = _esc(label_fmt(v))
            if narrow:
                ty = y0 - 3
                parts.append(f'<text class="value" transform="translate({_num(cx + 3)} {_num(ty)}) rotate(-90)">'
                             f"{text}</text>")
            else:
                parts.append(f'<text class="value" x="{_num(cx)}" y="{_num(y0 - 3)}" text-anchor="middle">{text}</text>')
        lx = L + ci * gw + gw / 2
        label = _esc(_truncate(cat, 22))
        if rotate_cats:
            parts.append(f'<text class="cat" transform="translate({_num(lx + 3)} {_num(T + ph + 10)}) rotate(-35)" '
                         f'text-anchor="end"><title>{_esc(cat)}</title>{label}</text>')
        else:
            parts.append(f'<text class="cat" x="{_num(lx)}" y="{_num(T + ph + 16)}" text-anchor="middle">'
                         f"<title>{_esc(cat)}</title>{label}</text>")
    parts.append(f'<line class="axis" x1="{_num(L)}" x2="{_num(W - R)}" y1="{_num(zero)}" y2="{_num(zero)}"/>'
                 f'<line class="axis" x1="{_num(L)}" x2="{_num(L)}" y1="{_num(T)}" y2="{_num(T + ph)}"/></svg>')
    return "".join(parts)


def stage_bars_svg(stages: Sequence[Mapping[str, Any]]) -> str:
    """Horizontal bars of stage durations, coloured by status."""
    rows = [(str(s.get("name", f"stage {i + 1}")), _finite(s.get("seconds")), str(s.get("status") or ""))
            for i, s in enumerate(stages)]
    W, L, R, T, row = 600.0, 150.0, 74.0, 8.0, 24.0
    H = T + row * len(rows) + 30.0
    pw = W - L - R
    vmax = max((v for _, v, _ in rows if v is not None), default=0.0)
    _, xhi, xticks = _linear_ticks(0.0, vmax if vmax > 0 else 1.0, 5)
    xstep = xticks[1] - xticks[0]
    px = lambda v: L + v / xhi * pw  # noqa: E731
    bottom = T + row * len(rows)
    parts = [_svg_open(W, H, "stage durations", "stages"), "<title>stage durations (seconds)</title>"]
    for t in xticks:
        x = px(t)
        parts.append(f'<line class="grid" x1="{_num(x)}" x2="{_num(x)}" y1="{_num(T)}" y2="{_num(bottom)}"/>'
                     f'<text class="tick" x="{_num(x)}" y="{_num(bottom + 14)}" text-anchor="middle">'
                     f"{_esc(_tick_label(t, xstep))}</text>")
    parts.append(f'<text class="axis-label" x="{_num(L + pw / 2)}" y="{_num(H - 3)}" text-anchor="middle">seconds</text>')
    for i, (name, secs, status) in enumerate(rows):
        y = T + i * row
        colour = STATUS_COLOURS.get(status.lower(), OTHER_STATUS_COLOUR)
        parts.append(f'<text class="cat" x="{_num(L - 8)}" y="{_num(y + row / 2 + 4)}" text-anchor="end">'
                     f"<title>{_esc(name)}</title>{_esc(_truncate(name, 24))}</text>")
        if secs is None:
            parts.append(f'<text class="na-mark" x="{_num(L + 4)}" y="{_num(y + row / 2 + 4)}">n/a</text>')
            continue
        w = max(px(max(secs, 0.0)) - L, 1.0)
        parts.append(f'<rect class="bar" x="{_num(L)}" y="{_num(y + 4)}" width="{_num(w)}" height="{_num(row - 8)}" '
                     f'fill="{colour}" data-status="{_esc(status)}"><title>{_esc(name)}: {_esc(format_seconds(secs))}'
                     f" ({_esc(status)})</title></rect>"
                     f'<text class="value" x="{_num(L + w + 5)}" y="{_num(y + row / 2 + 4)}">'
                     f"{_esc(format_seconds(secs))}</text>")
    parts.append(f'<line class="axis" x1="{_num(L)}" x2="{_num(L)}" y1="{_num(T)}" y2="{_num(bottom)}"/></svg>')
    return "".join(parts)


# ----------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------

def _cell(value: Any, first: bool = False, palette: _Palette | None = None, num_column: bool = False) -> str:
    numeric = _finite(value) is not None and not isinstance(value, str)
    if value is None:
        cls = ' class="num none"' if num_column else ' class="none"'
    else:
        cls = ' class="num"' if numeric else ""
    if isinstance(value, (float, bool)) or numeric:
        text = _esc(format_number(value))
    elif value is None:
        text = "—"
    elif isinstance(value, (dict, list, tuple)):
        text = _esc(json.dumps(value, default=str))
    else:
        text = _esc(value)
    if first and palette is not None and isinstance(value, str) and value in palette:
        text = f'<span class="swatch" style="background:{palette(value)}"></span>{text}'
    tag = "th" if first else "td"
    scope = ' scope="row"' if first else ""
    return f"<{tag}{scope}{cls}>{text}</{tag}>"


def _numeric_column(rows: Sequence[Sequence[Any]], j: int) -> bool:
    cells = [r[j] for r in rows if j < len(r) and r[j] is not None]
    return bool(cells) and all(_finite(c) is not None and not isinstance(c, str) for c in cells)


def _section_summary(summary: Mapping[str, Any], palette: _Palette) -> str:
    columns = _seq(summary.get("columns"))
    rows = [_seq(r) for r in _seq(summary.get("rows"))]
    numeric = [j > 0 and _numeric_column(rows, j) for j in range(max([len(columns)] + [len(r) for r in rows]))]
    num = ' class="num"'
    head = "".join(f'<th scope="col"{num if numeric[j] else ""}>{_esc(c)}</th>' for j, c in enumerate(columns))
    body = "".join("<tr>" + "".join(_cell(v, first=(j == 0), palette=palette, num_column=numeric[j])
                                    for j, v in enumerate(r)) + "</tr>" for r in rows)
    return (f'<div class="table-wrap"><table class="data summary"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _section_metrics(metrics: Mapping[str, Any]) -> str:
    cards = "".join(f'<div class="metric"><div class="metric-value">{_esc(format_number(v))}</div>'
                    f'<div class="metric-name">{_esc(k)}</div></div>' for k, v in metrics.items())
    return f'<div class="metrics">{cards}</div>'


def _status_badge(status: str) -> str:
    colour = STATUS_COLOURS.get(status.lower(), OTHER_STATUS_COLOUR)
    return f'<span class="badge" style="border-color:{colour};color:{colour}">{_esc(status or "?")}</span>'


def _section_stages(stages: Sequence[Mapping[str, Any]]) -> str:
    body = []
    total = 0.0
    for s in stages:
        secs = _finite(s.get("seconds"))
        total += secs or 0.0
        hit = s.get("cache_hit")
        run = s.get("mlflow_run_id")
        run_cell = f'<code title="{_esc(run)}">{_esc(_truncate(str(run), 14))}</code>' if run else "—"
        body.append(f'<tr><th scope="row">{_esc(s.get("name", ""))}</th>'
                    f'<td>{_status_badge(str(s.get("status") or ""))}</td>'
                    f'<td>{"—" if hit is None else ("hit" if hit else "miss")}</td>'
                    f'<td class="num">{_esc(format_seconds(secs))}</td>'
                    f"<td>{run_cell}</td>"
                    f'<td class="detail">{_esc(s.get("detail") or "")}</td></tr>')
    statuses = []
    for s in stages:
        st = str(s.get("status") or "")
        if st and st not in statuses:
            statuses.append(st)
    keys = "".join(f'<span class="key"><span class="swatch" style="background:'
                   f'{STATUS_COLOURS.get(st.lower(), OTHER_STATUS_COLOUR)}"></span>{_esc(st)}</span>' for st in statuses)
    table = ('<div class="table-wrap"><table class="data stages"><thead><tr><th scope="col">stage</th>'
             '<th scope="col">status</th><th scope="col">cache</th><th scope="col" class="num">duration</th>'
             '<th scope="col">MLflow run</th><th scope="col">detail</th></tr></thead>'
             f'<tbody>{"".join(body)}</tbody><tfoot><tr><th scope="row">total</th><td></td><td></td>'
             f'<td class="num">{_esc(format_seconds(total))}</td><td></td><td></td></tr></tfoot></table></div>')
    chart = f'<figure class="chart-box wide">{stage_bars_svg(stages)}<div class="legend">{keys}</div></figure>'
    return table + chart


def _section_curves(curves: Mapping[str, Mapping[str, Any]], log_y: Iterable[str], palette: _Palette) -> str:
    log_set = {str(p) for p in (log_y or ())}
    figs = []
    for panel, series in curves.items():
        series = series or {}
        svg = line_chart_svg(str(panel), series, palette, log_y=str(panel) in log_set)
        legend = _legend([str(n) for n in series], palette) if svg.startswith("<svg") else ""
        scale = ' <span class="muted">(log y)</span>' if str(panel) in log_set else ""
        figs.append(f'<figure class="chart-box"><figcaption>{_esc(panel)}{scale}</figcaption>{svg}{legend}</figure>')
    return f'<div class="grid">{"".join(figs)}</div>'


def _section_eval(bars: Mapping[str, Mapping[str, Any]], palette: _Palette) -> str:
    figs = []
    for bench, spec in bars.items():
        spec = spec or {}
        cats = _seq(spec.get("categories"))
        series = dict(spec.get("series") or {})
        svg = grouped_bars_svg(str(bench), cats, series, palette)
        wide = " wide" if len(cats) * len(series) > 24 else ""
        legend = _legend([str(m) for m in series], palette) if svg.startswith("<svg") else ""
        figs.append(f'<figure class="chart-box{wide}"><figcaption>{_esc(bench)}</figcaption>{svg}{legend}</figure>')
    return f'<div class="grid">{"".join(figs)}</div>'


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
          (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"))


def _image_data(raw: bytes) -> tuple[str, bytes, int, int]:
    """(mime, bytes, width, height); bytes PIL opens but browsers may not are re-encoded as PNG."""
    with Image.open(io.BytesIO(raw)) as im:
        im.load()
        w, h = im.size
        for magic, mime in _MAGIC:
            if raw.startswith(magic):
                return mime, raw, w, h
        if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
            return "image/webp", raw, w, h
        buf = io.BytesIO()
        im.convert("RGBA" if "A" in im.getbands() else "RGB").save(buf, format="PNG")
        return "image/png", buf.getvalue(), w, h


def _figure_image(item: Mapping[str, Any]) -> str:
    title = str(item.get("title") or "")
    caption = str(item.get("caption") or "")
    sub = f'<span class="muted">{_esc(caption)}</span>' if caption else ""
    cap = f"<figcaption><strong>{_esc(title)}</strong>{sub}</figcaption>"
    raw = item.get("png")
    where = item.get("path")
    if raw is None and where is not None:
        p = Path(os.fspath(where))
        if not p.is_file():
            return f'<figure class="image-box">{cap}<p class="na">image missing: {_esc(where)}</p></figure>'
        raw = p.read_bytes()
    if not raw:
        what = f"image missing: {where}" if where else "image missing: no path or bytes given"
        return f'<figure class="image-box">{cap}<p class="na">{_esc(what)}</p></figure>'
    try:
        mime, data, w, h = _image_data(bytes(raw))
    except Exception as e:  # noqa: BLE001 - any undecodable payload becomes a visible note
        src = where if where else f"{len(raw)} bytes"
        return (f'<figure class="image-box">{cap}<p class="na">image unreadable: {_esc(src)} '
                f"({_esc(type(e).__name__)})</p></figure>")
    scale = max(1, min(4, 256 // max(w, h, 1)))          # small sample grids are shown enlarged
    pixelated = ' class="pixelated"' if scale > 1 else ""
    alt = title or caption or "image"
    b64 = base64.b64encode(data).decode("ascii")
    tip = f' title="{_esc(where)}"' if where else ""
    return (f'<figure class="image-box">{cap}<img{pixelated} src="data:{mime};base64,{b64}" width="{w * scale}" '
            f'height="{h * scale}" alt="{_esc(alt)}" data-natural-size="{w}x{h}"'
            f"{tip}></figure>")


def _section_images(images: Sequence[Mapping[str, Any]]) -> str:
    return f'<div class="images">{"".join(_figure_image(i) for i in images)}</div>'


def _passed(v: Any) -> str:
    if v is None:
        return "—"
    return '<span class="pass">✓ pass</span>' if v else '<span class="fail">✗ fail</span>'


def _section_exports(exports: Sequence[Mapping[str, Any]]) -> str:
    largest = max((_finite(e.get("bytes")) or 0.0 for e in exports), default=0.0) or 1.0
    body = []
    for e in exports:
        size = _finite(e.get("bytes"))
        frac = 0.0 if size is None else max(0.0, min(1.0, size / largest))
        parity = _finite(e.get("parity"))
        where = f'<code>{_esc(e["path"])}</code>' if e.get("path") else "—"
        size_cell = ("—" if size is None else
                     f'<span class="sizebar" style="width:calc((100% - 16px) * {frac:.3f})"></span>'
                     f'<span title="{int(size):,} bytes">{_esc(format_bytes(size))}</span>')
        body.append(f'<tr><th scope="row">{_esc(e.get("part", ""))}</th><td>{_esc(e.get("format", ""))}</td>'
                    f'<td class="num size">{size_cell}</td><td class="num">{_esc(format_count(e.get("params")))}</td>'
                    f'<td class="num">{"—" if parity is None else _esc(f"{parity:.2e}")}</td>'
                    f'<td>{_passed(e.get("passed"))}</td>'
                    f"<td>{where}</td></tr>")
    return ('<div class="table-wrap"><table class="data exports"><thead><tr><th scope="col">part</th>'
            '<th scope="col">format</th><th scope="col" class="num">size</th><th scope="col" class="num">params</th>'
            '<th scope="col" class="num">parity (max |Δ|)</th><th scope="col">parity check</th><th scope="col">path</th>'
            f'</tr></thead><tbody>{"".join(body)}</tbody></table></div>')


def _section_lineage(lineage: Mapping[str, Any]) -> str:
    rows = []
    for k, v in lineage.items():
        if isinstance(v, (dict, list, tuple)):
            v = json.dumps(v, default=str)
        text = "—" if v is None else f"<code>{_esc(v)}</code>"
        rows.append(f'<tr><th scope="row">{_esc(k)}</th><td>{text}</td></tr>')
    return f'<div class="table-wrap"><table class="data lineage"><tbody>{"".join(rows)}</tbody></table></div>'


def _section_links(links: Mapping[str, Any]) -> str:
    items = []
    for label, url in links.items():
        u = str(url or "")
        if u.lower().startswith(_LINK_SCHEMES):
            items.append(f'<li><a href="{_esc(u)}" rel="noopener noreferrer">{_esc(label)}</a> '
                         f'<span class="muted">{_esc(u)}</span></li>')
        else:  # javascript:, relative or empty: shown, never linked
            items.append(f'<li>{_esc(label)} <span class="muted">{_esc(u) or "—"}</span></li>')
    return f'<ul class="links">{"".join(items)}</ul>'


# ----------------------------------------------------------------------------------------------
# dashboard sections: model cards, the champion, captioned samples, run links
# ----------------------------------------------------------------------------------------------

def _gauge(m: Mapping[str, Any]) -> str:
    """One metric of a model card: value, a bar on an axis that holds floor, ceiling and value, and
    where the value sits between floor and ceiling."""
    name, value = str(m.get("name") or ""), _finite(m.get("value"))
    floor, ceiling = _finite(m.get("floor")), _finite(m.get("ceiling"))
    higher = m.get("higher_is_better", True) is not False
    head = (f'<div class="gauge-head"><span class="gauge-name">{_esc(name)}</span>'
            f'<span class="gauge-value">{_esc(format_number(value))}</span></div>')
    known = [v for v in (value, floor, ceiling) if v is not None]
    if value is None or (floor is None and ceiling is None):
        hint = "higher is better" if higher else "lower is better"
        note = "no value" if value is None else f"no floor or ceiling for this metric; {hint}"
        return f'<div class="gauge-row">{head}<div class="gauge-verdict muted">{_esc(note)}</div></div>'
    lo = min(0.0, *known)
    hi = max(known)
    hi = 1.0 if hi <= 1.0 and lo >= 0.0 else hi
    span = (hi - lo) or 1.0

    def pos(v: float) -> float:
        return max(0.0, min(100.0, 100.0 * (v - lo) / span))

    marks = "".join(f'<span class="gauge-mark {cls}" style="left:{pos(v):.2f}%" title="{cls} {_esc(format_number(v))}">'
                    f"</span>" for cls, v in (("floor", floor), ("ceiling", ceiling)) if v is not None)
    label = (f"{name} {format_number(value)}" + (f", floor {format_number(floor)}" if floor is not None else "")
             + (f", ceiling {format_number(ceiling)}" if ceiling is not None else ""))
    bar = (f'<div class="gauge" role="img" aria-label="{_esc(label)}">'
           f'<span class="gauge-fill" style="width:{pos(value):.2f}%"></span>{marks}</div>')
    scale = (f'<div class="gauge-scale"><span>floor {_esc(format_number(floor))}</span>'
             f'<span>ceiling {_esc(format_number(ceiling))}</span></div>')
    verdict = ""
    if floor is not None and ceiling is not None and ceiling != floor:
        share = (value - floor) / (ceiling - floor)
        if not higher:
            share = (floor - value) / (floor - ceiling)
        where = ("below the floor" if share < 0 else "at or above the ceiling" if share >= 1
                 else f"{share:.0%} of the way from floor to ceiling")
        cls = "fail" if share < 0 else "pass" if share >= 0.5 else ""
        verdict = f'<div class="gauge-verdict {cls}">{_esc(where)}</div>'
    return f'<div class="gauge-row">{head}{bar}{scale}{verdict}</div>'


def _section_model_cards(cards: Sequence[Mapping[str, Any]], palette: _Palette) -> str:
    out = []
    for card in cards:
        model = str(card.get("model") or "model")
        sub = f'<p class="muted card-sub">{_esc(card["subtitle"])}</p>' if card.get("subtitle") else ""
        gauges = "".join(_gauge(m) for m in _seq(card.get("metrics")) if isinstance(m, Mapping))
        out.append(f'<div class="model-card" style="border-top-color:{palette(model)}"><h3>{_esc(model)}</h3>'
                   f"{sub}{gauges}</div>")
    return f'<div class="model-cards">{"".join(out)}</div>'


def _section_champion(info: Mapping[str, Any]) -> str:
    cand, champ = info.get("candidate"), info.get("champion")
    passed = info.get("passed")
    verdict = str(info.get("verdict") or "")
    head = (f'<p class="champion-verdict">{_passed(passed) if passed is not None else ""} '
            f"<strong>{_esc(verdict)}</strong></p>") if verdict else ""
    reasons = "".join(f"<li>{_esc(r)}</li>" for r in _seq(info.get("reasons")))
    reasons = f'<ul class="reasons">{reasons}</ul>' if reasons else ""
    note = f'<p class="muted">{_esc(info["note"])}</p>' if info.get("note") else ""
    rows = []
    for r in _seq(info.get("rows")):
        a, b = _finite(r.get("candidate")), _finite(r.get("champion"))
        higher = r.get("higher_is_better", True) is not False
        if a is None or b is None:
            delta, cls = "—", ""
        else:
            d = a - b
            better = d > 0 if higher else d < 0
            cls = "pass" if better else ("fail" if d != 0 else "")
            delta = f'<span class="{cls}">{"+" if d > 0 else ""}{_esc(format_number(d))}</span>'
        rows.append(f'<tr><th scope="row">{_esc(r.get("metric"))}</th><td class="num">{_esc(format_number(a))}</td>'
                    f'<td class="num">{_esc(format_number(b))}</td><td class="num">{delta}</td>'
                    f'<td>{"higher is better" if higher else "lower is better"}</td></tr>')
    table = ""
    if rows:
        table = ('<div class="table-wrap"><table class="data champion"><thead><tr><th scope="col">metric</th>'
                 f'<th scope="col" class="num">this run ({_esc(cand or "?")})</th>'
                 f'<th scope="col" class="num">previous champion ({_esc(champ or "none")})</th>'
                 '<th scope="col" class="num">Δ</th><th scope="col">direction</th></tr></thead>'
                 f'<tbody>{"".join(rows)}</tbody></table></div>')
    return head + reasons + table + note


def _img_tag(item: Mapping[str, Any], alt: str, min_side: int = 96) -> str:
    """An embedded <img> (data URI), or a visible note when the picture is missing or unreadable."""
    raw, where = item.get("png"), item.get("path")
    if raw is None and where is not None:
        p = Path(os.fspath(where))
        raw = p.read_bytes() if p.is_file() else None
    if not raw:
        return f'<p class="na">image missing: {_esc(where or "no path or bytes given")}</p>'
    try:
        mime, data, w, h = _image_data(bytes(raw))
    except Exception as e:  # noqa: BLE001 - an undecodable picture becomes a note
        return f'<p class="na">image unreadable: {_esc(where or "bytes")} ({_esc(type(e).__name__)})</p>'
    scale = max(1, min(4, min_side // max(w, h, 1)))
    pixelated = ' class="pixelated"' if scale > 1 else ""
    b64 = base64.b64encode(data).decode("ascii")
    return (f'<img{pixelated} src="data:{mime};base64,{b64}" width="{w * scale}" height="{h * scale}" '
            f'alt="{_esc(alt)}" data-natural-size="{w}x{h}">')


def _section_gallery(groups: Sequence[Mapping[str, Any]], palette: _Palette) -> str:
    out = []
    for group in groups:
        model = str(group.get("model") or "model")
        items = [i for i in _seq(group.get("items")) if isinstance(i, Mapping)]
        marks = [i.get("passed") for i in items if i.get("passed") is not None]
        tally = f"{sum(bool(m) for m in marks)} of {len(marks)} pass" if marks else "not scored"
        caption = f' <span class="muted">{_esc(group["caption"])}</span>' if group.get("caption") else ""
        figures = []
        for item in items:
            prompt = str(item.get("prompt") or "")
            passed = item.get("passed")
            state = "pass" if passed else ("fail" if passed is not None else "unscored")
            mark = _passed(passed) if passed is not None else '<span class="muted">not scored</span>'
            reason = f'<span class="reason">{_esc(item["reason"])}</span>' if item.get("reason") and not passed else ""
            detail = f'<span class="muted">{_esc(item["detail"])}</span>' if item.get("detail") else ""
            figures.append(f'<figure class="sample {state}">{_img_tag(item, prompt or model)}'
                           f'<figcaption><span class="mark">{mark}</span><span class="prompt">{_esc(prompt)}</span>'
                           f"{reason}{detail}</figcaption></figure>")
        out.append(f'<div class="gallery-model"><h3><span class="swatch" style="background:{palette(model)}"></span>'
                   f'{_esc(model)} <span class="tally">{_esc(tally)}</span>{caption}</h3>'
                   f'<div class="gallery">{"".join(figures)}</div></div>')
    return "".join(out)


def _link(url: Any, text: str) -> str:
    u = str(url or "")
    if u.lower().startswith(_LINK_SCHEMES):
        return f'<a href="{_esc(u)}" rel="noopener noreferrer">{_esc(text)}</a>'
    return f"<code>{_esc(text)}</code>" if text else "—"


def _section_run_links(rows: Sequence[Mapping[str, Any]]) -> str:
    body = []
    for r in rows:
        ml = _link(r.get("mlflow"), _truncate(str(r.get("mlflow_run_id") or ""), 14)) if r.get("mlflow_run_id") else "—"
        pf = _link(r.get("prefect"), _truncate(str(r.get("flow_run_id") or ""), 14)) if r.get("flow_run_id") else "—"
        body.append(f'<tr><th scope="row">{_esc(r.get("name", ""))}</th><td>{ml}</td><td>{pf}</td></tr>')
    return ('<div class="table-wrap"><table class="data runs"><thead><tr><th scope="col">what ran</th>'
            '<th scope="col">MLflow run</th><th scope="col">Prefect flow run</th></tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, Mapping):
        if set(value) <= {"columns", "rows"} and "rows" in value:
            return len(_seq(value.get("rows"))) > 0
        return bool(value)
    try:
        return len(value) > 0
    except TypeError:
        return True


# ----------------------------------------------------------------------------------------------
# document
# ----------------------------------------------------------------------------------------------

_CSS = """
:root{--fg:#1f2933;--muted:#616e7c;--line:#d9dee4;--bg:#f4f6f8;--card:#fff;--accent:#2f5d8a}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--fg);
 font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue","DejaVu Sans",Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:24px 20px 40px}
header.top{background:#1f3a56;color:#fff;padding:22px 0 18px}
header.top .inner{max-width:1180px;margin:0 auto;padding:0 20px}
header.top h1{margin:0 0 2px;font-size:24px;font-weight:650;letter-spacing:.1px}
header.top .subtitle{color:#cfdae6;font-size:15px;margin:0 0 10px}
.meta{display:flex;flex-wrap:wrap;gap:6px 18px;font-size:12.5px;color:#cfdae6}
.meta b{color:#fff;font-weight:600}
.meta code{color:#fff;background:rgba(255,255,255,.12)}
nav.toc{display:flex;flex-wrap:wrap;gap:4px 6px;margin-top:14px}
nav.toc a{color:#fff;text-decoration:none;font-size:12.5px;padding:3px 10px;border-radius:12px;
 background:rgba(255,255,255,.12)}
nav.toc a:hover{background:rgba(255,255,255,.25)}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:16px 20px 18px;margin:0 0 18px}
section>h2{margin:0 0 12px;font-size:17px;font-weight:650;color:var(--accent)}
.callout{border-left:4px solid #edc948;background:#fffbea;border-radius:6px;padding:10px 16px;margin:0 0 18px}
.callout ul{margin:0;padding-left:18px}
.na{color:#8a5a00;background:#fff6e0;border:1px dashed #e0b050;border-radius:6px;padding:6px 10px;margin:6px 0;
 font-size:13px}
.muted{color:var(--muted);font-size:12.5px;margin-left:6px}
code{font:12px/1.3 "DejaVu Sans Mono",Menlo,Consolas,monospace;background:#eef1f4;padding:1px 4px;border-radius:3px;
 word-break:break-all}
.table-wrap{overflow-x:auto}
table.data{border-collapse:collapse;width:100%;font-size:13px}
table.data th,table.data td{padding:6px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
table.data thead th{background:#f0f3f6;font-weight:600;color:#3e4c59;border-bottom:2px solid var(--line);
 white-space:nowrap}
table.data tbody tr:nth-child(even){background:#fafbfc}
table.data tbody th{font-weight:600;min-width:8em;max-width:26em;overflow-wrap:anywhere}
table.data tfoot th,table.data tfoot td{font-weight:600;border-top:2px solid var(--line);border-bottom:none}
table.data td.num,table.data th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.none{color:var(--muted)}
td.detail{color:#3e4c59}
td.size{position:relative;min-width:110px}
.sizebar{position:absolute;left:8px;top:5px;bottom:5px;background:#dde7f1;border-radius:2px;z-index:0}
td.size span[title]{position:relative;z-index:1}
table.lineage th{width:220px;color:#3e4c59}
.badge{display:inline-block;border:1px solid;border-radius:10px;padding:0 8px;font-size:12px;font-weight:600}
.pass{color:#2e7d32;font-weight:600}.fail{color:#c62828;font-weight:600}
.metrics{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px}
.metric{border:1px solid var(--line);border-radius:6px;padding:10px 12px;background:#fafbfc}
.metric-value{font-size:20px;font-weight:650;font-variant-numeric:tabular-nums}
.metric-name{color:var(--muted);font-size:12px;word-break:break-word}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:16px}
figure{margin:0}
.chart-box{border:1px solid var(--line);border-radius:6px;padding:10px 12px 8px;min-width:0}
.chart-box.wide{grid-column:1/-1}
section#stages .chart-box{margin-top:14px;max-width:760px}
.chart-box figcaption{font-weight:600;font-size:13.5px;margin-bottom:4px}
svg.chart{display:block;width:100%;height:auto;max-width:100%;font-family:inherit}
svg.chart .grid{stroke:#e6e9ed;stroke-width:1}
svg.chart .axis{stroke:#9aa5b1;stroke-width:1}
svg.chart .tickmark{stroke:#9aa5b1}
svg.chart text{fill:#3e4c59;font-size:12px}
svg.chart .axis-label{fill:var(--muted);font-size:12px}
svg.chart .value{font-size:10.5px;fill:#1f2933}
svg.chart .cat{font-size:12px}
svg.chart .na-mark{font-size:10px;fill:#b0803a}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:12px;color:#3e4c59;margin-top:6px}
.key{display:inline-flex;align-items:center}
.swatch{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:6px;vertical-align:-1px}
.images{display:grid;grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:16px;align-items:start}
.image-box{border:1px solid var(--line);border-radius:6px;padding:10px;min-width:0}
.image-box figcaption{margin-bottom:6px;font-size:13px}
.image-box figcaption .muted{display:block;margin:2px 0 0}
.image-box img{display:block;max-width:100%;height:auto;border-radius:3px;background:#eef1f4}
img.pixelated{image-rendering:pixelated}
ul.links{margin:0;padding-left:18px}
ul.links a{color:var(--accent);font-weight:600}
footer{color:var(--muted);font-size:12px;text-align:center;margin-top:8px}
section h3{margin:0 0 8px;font-size:14.5px;font-weight:650}
.model-cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:14px}
.model-card{border:1px solid var(--line);border-top:4px solid var(--accent);border-radius:6px;padding:10px 14px 12px;
 background:#fafbfc;min-width:0}
.model-card .card-sub{display:block;margin:-4px 0 8px}
.gauge-row{margin:8px 0 10px}
.gauge-head{display:flex;justify-content:space-between;align-items:baseline}
.gauge-name{color:#3e4c59;font-size:12.5px}
.gauge-value{font-size:18px;font-weight:650;font-variant-numeric:tabular-nums}
.gauge{position:relative;height:10px;background:#e6e9ed;border-radius:5px;margin:4px 0 2px}
.gauge-fill{position:absolute;left:0;top:0;bottom:0;background:#4e79a7;border-radius:5px}
.gauge-mark{position:absolute;top:-4px;bottom:-4px;width:2px;margin-left:-1px}
.gauge-mark.floor{background:#c62828}.gauge-mark.ceiling{background:#2e7d32}
.gauge-scale{display:flex;justify-content:space-between;font-size:11px;color:var(--muted)}
.gauge-verdict{font-size:12px}
.champion-verdict{margin:0 0 8px}
ul.reasons{margin:0 0 10px;padding-left:18px;color:#8a1c1c;font-size:13px}
.gallery-model{margin:0 0 16px}
.gallery-model h3 .tally{font-weight:500;color:#3e4c59;margin-left:6px;font-size:12.5px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}
figure.sample{border:1px solid var(--line);border-left:4px solid #bab0ac;border-radius:6px;padding:6px;min-width:0}
figure.sample.pass{border-left-color:#2e7d32}figure.sample.fail{border-left-color:#c62828}
figure.sample img{display:block;max-width:100%;height:auto;margin:0 auto 4px;border-radius:3px}
figure.sample figcaption{font-size:12.5px;line-height:1.35;overflow-wrap:anywhere}
figure.sample .mark{display:block;font-size:12px}
figure.sample .prompt{display:block;color:#1f2933}
figure.sample .reason{display:block;color:#8a1c1c;font-size:11.5px}
figure.sample .muted{display:block;margin:0;font-size:11.5px}
table.runs a{color:var(--accent);font-weight:600}
@media (max-width:700px){.grid{grid-template-columns:1fr}main{padding:14px 10px}}
@media print{body{background:#fff}section{break-inside:avoid}}
"""


def render_run_report(data: Mapping[str, Any]) -> str:
    """The whole report as one self-contained HTML document (see the module docstring for ``data``)."""
    data = dict(data or {})
    missing = {_ALIASES.get(str(k), str(k)): str(v) for k, v in dict(data.get("missing") or {}).items()}
    palette = _Palette()
    for spec in dict(data.get("eval_bars") or {}).values():      # models first: they own the palette
        for model in dict((spec or {}).get("series") or {}):
            palette(model)
    for series in dict(data.get("curves") or {}).values():
        for name in dict(series or {}):
            palette(name)

    title = str(data.get("title") or "SnapGen run report")
    meta = []
    for key, label in (("created", "created"), ("preset", "preset"), ("run_id", "MLflow run"),
                       ("flow_run_id", "Prefect flow run")):
        if data.get(key):
            val = f"<code>{_esc(data[key])}</code>" if key.endswith("id") else _esc(data[key])
            if key == "created":
                val = f'<time datetime="{_esc(data[key])}">{_esc(_when(data[key]))}</time>'
            meta.append(f"<span>{label}: <b>{val}</b></span>")

    body: list[str] = []
    toc: list[str] = []
    notes = [str(n) for n in _seq(data.get("notes"))]
    extra = [f"not available: {k}: {v}" for k, v in missing.items() if k not in SECTIONS]
    if notes or extra:
        items = "".join(f"<li>{_esc(n)}</li>" for n in notes + extra)
        body.append(f'<aside class="callout" id="notes"><ul>{items}</ul></aside>')

    renderers = {
        "key_metrics": lambda v: _section_metrics(v),
        "summary": lambda v: _section_summary(v, palette),
        "stages": lambda v: _section_stages(list(v)),
        "curves": lambda v: _section_curves(v, data.get("curves_log_y") or (), palette),
        "eval_bars": lambda v: _section_eval(v, palette),
        "images": lambda v: _section_images(list(v)),
        "exports": lambda v: _section_exports(list(v)),
        "lineage": lambda v: _section_lineage(v),
        "links": lambda v: _section_links(v),
        "model_cards": lambda v: _section_model_cards(list(v), palette),
        "champion": lambda v: _section_champion(v),
        "gallery": lambda v: _section_gallery(list(v), palette),
        "run_links": lambda v: _section_run_links(list(v)),
    }
    for key, (sid, heading) in SECTIONS.items():
        value = data.get(key)
        reason = missing.get(key)
        if _present(value):
            content = renderers[key](value)
            if reason:
                content += f'<p class="na">note: {_esc(reason)}</p>'
        elif reason:
            content = f'<p class="na">not available: {_esc(reason)}</p>'
        else:
            continue
        toc.append(f'<a href="#{sid}">{_esc(heading)}</a>')
        body.append(f'<section id="{sid}"><h2>{_esc(heading)}</h2>{content}</section>')

    subtitle = f'<p class="subtitle">{_esc(data["subtitle"])}</p>' if data.get("subtitle") else ""
    header = (f'<header class="top"><div class="inner"><h1>{_esc(title)}</h1>{subtitle}'
              f'<div class="meta">{"".join(meta)}</div><nav class="toc">{"".join(toc)}</nav></div></header>')
    stamp = f" · generated {_esc(_when(data['created']))}" if data.get("created") else ""
    footer = f"<footer>snapgen run report{stamp}</footer>"
    return ("<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<meta name="color-scheme" content="light">'
            '<link rel="icon" href="data:,">'
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head>\n"
            f"<body>{header}<main>{''.join(body)}{footer}</main></body></html>\n")


def write_run_report(data: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Render and write atomically (a temp file in the same folder, then os.replace); returns the path."""
    target = Path(os.fspath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    text = render_run_report(data)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target


if __name__ == "__main__":  # python -m reporting.html data.json report.html
    if len(sys.argv) != 3:
        sys.exit("usage: python -m reporting.html DATA.json OUT.html")
    print(write_run_report(json.loads(Path(sys.argv[1]).read_text()), sys.argv[2]))
