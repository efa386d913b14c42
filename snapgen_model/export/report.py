"""The export report: JSON (everything) and markdown (the tables a reviewer reads), plus the paper's
mobile budget beside our parameter and MAC counts (SNAPGEN_SPEC.md sections 1, 2, 7).

The paper measures 274 ms per UNet step and ~120 ms for the tiny decoder at 1024^2 on an iPhone 16
Pro Max (Core ML, FP16), ~1.4 s end to end at 4 steps. We cannot measure a phone here; the report
puts our counts next to the paper model's and gives a naive MAC-proportional projection (our MACs
/ the reference architecture's MACs at 1024^2 x the paper's latency), labelled as such.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

PAPER_BUDGET = {
    "device": "iPhone 16 Pro Max (Core ML, FP16)",
    "resolution": 1024,
    "unet_ms_per_step": 274.0,
    "decoder_ms": 120.0,
    "steps": 4,
    "end_to_end_s": 1.4,
    "unet_params": 379e6,
    "decoder_params": 1.38e6,
}


@functools.lru_cache(maxsize=1)
def reference_macs() -> dict[str, int]:
    """MACs of the snapgen-1024 architecture at 1024^2 (meta device: nothing allocated)."""
    from snapgen_model.inspect import inspect_config
    from snapgen_model.presets import get_preset

    report = inspect_config(get_preset("snapgen-1024"))
    return {"unet_macs": report.unet_macs, "decoder_macs": report.decoder_macs,
            "unet_params": report.unet_params, "decoder_params": report.decoder_params}


def paper_budget(parts: dict[str, dict]) -> dict[str, Any]:
    """The paper's mobile budget beside our counts, with a MAC-proportional projection."""
    ref = reference_macs()
    budget: dict[str, Any] = {"paper": dict(PAPER_BUDGET), "reference_architecture_1024": ref, "ours": {}}
    for name, ms_key, ref_key in (("unet", "unet_ms_per_step", "unet_macs"), ("decoder", "decoder_ms", "decoder_macs")):
        entry = parts.get(name)
        if not entry:
            continue
        projected = PAPER_BUDGET[ms_key] * entry["macs"] / ref[ref_key] if ref[ref_key] else None
        budget["ours"][name] = {"params": entry["params"], "macs": entry["macs"], "resolution": entry["resolution"],
                                "params_vs_paper": round(entry["params"] / PAPER_BUDGET[f"{name}_params"], 6),
                                "projected_phone_ms": float(f"{projected:.4g}") if projected is not None else None}
    ours = budget["ours"]
    if "unet" in ours and "decoder" in ours:
        steps = PAPER_BUDGET["steps"]
        total = steps * ours["unet"]["projected_phone_ms"] + ours["decoder"]["projected_phone_ms"]
        ours["projected_end_to_end_ms"] = float(f"{total:.4g}")
    budget["note"] = ("projected_phone_ms = paper latency x (our MACs / snapgen-1024 MACs at 1024^2): a naive "
                      "MAC-proportional estimate, not a measurement")
    return budget


def _finite(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become strings ("inf", "-inf", "nan")."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """`report.json` and `report.md` in `out_dir`."""
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(json.dumps(_finite(report), indent=2, sort_keys=False, default=str) + "\n")
    md_path.write_text(report_markdown(report))
    return json_path, md_path


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.3f} MB"


def _num(n: float | None, unit: str = "") -> str:
    if n is None:
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


def _parity(p: dict | None) -> str:
    if not p:
        return "-"
    if "status" in p and "psnr" not in p:
        return p["status"]
    mark = "pass" if p.get("passed") else "FAIL"
    return f"{mark}: max_abs {p['max_abs']:.2e}, rel {p['rel']:.2e}, PSNR {p['psnr']:.1f} dB"


def parity_rows(report: dict) -> list[dict[str, str]]:
    """One row per (part, artifact): file, size, parity, latency. Shared by markdown and the CLI table."""
    rows = []
    for name, part in report.get("parts", {}).items():
        for variant, art in part.get("onnx", {}).items():
            lat = art.get("latency") or {}
            timing = f"ORT {lat['ort_ms']:.2f} ms / torch {lat['torch_ms']:.2f} ms" if lat else "-"
            rows.append({"part": name, "artifact": art["path"], "size": _mb(art["bytes"]),
                         "parity": _parity(art.get("parity")), "latency": timing})
        cm = part.get("coreml")
        if cm and "path" in cm:
            checks = f"torch swap {_parity(cm['swap_parity'])}; predict: {_parity(cm['prediction_parity'])}"
            rows.append({"part": name, "artifact": cm["path"], "size": _mb(cm["bytes"]), "parity": checks,
                         "latency": "-"})
            pal = cm.get("palettized")
            if pal:
                rows.append({"part": name, "artifact": pal["path"],
                             "size": f"{_mb(pal['bytes'])} ({pal['ratio']:.2f}x of {_mb(pal['bytes_before'])})",
                             "parity": f"predict: {_parity(pal['prediction_parity'])}", "latency": "-"})
    return rows


def report_markdown(report: dict) -> str:
    lines = [f"# Export report: {report['preset']} ({report['resolution']})", "",
             f"export key `{report['export_key'][:16]}`, formats {', '.join(report['formats'])}, "
             f"{report['seconds']:.1f} s on {report['platform']}", "",
             "## Parts", "", "| part | params | MACs | resolution | source |", "|---|---|---|---|---|"]
    for name, part in report["parts"].items():
        lines.append(f"| {name} | {_num(part['params'])} | {_num(part['macs'])} | {part['resolution']} | "
                     f"{part['source'].get('kind', '-')} |")
    for name, why in report.get("skipped_parts", {}).items():
        lines.append(f"| {name} | - | - | - | skipped: {why} |")
    lines += ["", "## Artifacts and parity", "", "| part | artifact | size | parity | CPU latency |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['part']} | {r['artifact']} | {r['size']} | {r['parity']} | {r['latency']} |"
              for r in parity_rows(report)]
    gen = report.get("generation")
    if gen:
        lines += ["", "## Few-step generation through ONNX Runtime", "",
                  f"{gen['steps']} {gen['sampler']} steps, seeds {gen['seeds']}: image PSNR {gen['image_psnr']:.1f} dB "
                  f"(threshold {gen['min_psnr']:.1f} dB, {'pass' if gen['passed'] else 'FAIL'}); latent max_abs "
                  f"{gen['latent']['max_abs']:.2e}; ORT {gen['ort_s']:.3f} s vs torch {gen['torch_s']:.3f} s"]
    lines += _budget_lines(report.get("paper_budget"))
    lines += ["", "## Core ML on this platform", "", report.get("coreml_note", "-"), ""]
    return "\n".join(lines)


def _budget_lines(budget: dict | None) -> list[str]:
    if not budget:
        return []
    paper, ref, ours = budget["paper"], budget["reference_architecture_1024"], budget["ours"]
    lines = ["", "## Mobile budget (paper) beside our counts", "",
             "| part | paper params | paper latency | ref. MACs @1024 | our params | our MACs | projected phone |",
             "|---|---|---|---|---|---|---|"]
    latencies = (("unet", f"{paper['unet_ms_per_step']:.0f} ms/step"), ("decoder", f"{paper['decoder_ms']:.0f} ms"))
    for name, ms in latencies:
        o = ours.get(name)
        mine = f"{_num(o['params'])} | {_num(o['macs'])} @ {o['resolution']}" if o else "- | -"
        projected = o.get("projected_phone_ms") if o else None
        lines.append(f"| {name} | {_num(paper[name + '_params'])} | {ms} | {_num(ref[name + '_macs'])} | {mine} | "
                     f"{'-' if projected is None else f'{projected:.3g} ms'} |")
    if "projected_end_to_end_ms" in ours:
        lines.append(f"| end to end ({paper['steps']} steps) | | {paper['end_to_end_s']} s | | | | "
                     f"{ours['projected_end_to_end_ms']:.3g} ms |")
    return lines + ["", f"_{budget['note']}; device: {paper['device']}._"]
