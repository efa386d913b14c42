"""Rendering of reports as rich tables and markdown (no tensor code)."""
from __future__ import annotations

from typing import Any

from rich.table import Table


def _fmt_params(n: float) -> str:
    return f"{n / 1e6:,.2f}M" if n >= 1e5 else f"{n / 1e3:,.1f}K"


def _fmt_macs(n: float) -> str:
    return f"{n / 1e9:,.2f}G" if n >= 1e8 else f"{n / 1e6:,.2f}M"


def _summary(report: dict[str, Any]) -> str:
    line = (f"UNet {_fmt_params(report['unet_params'])} params, {_fmt_macs(report['unet_macs'])} MACs/step; "
            f"tiny decoder {_fmt_params(report['decoder_params'])} params, {_fmt_macs(report['decoder_macs'])} MACs")
    if report.get("paper_params"):
        gap = report["unet_params"] / report["paper_params"] - 1
        line += f"; paper: {_fmt_params(report['paper_params'])} ({gap:+.1%})"
    return line


def inspect_table(report: dict[str, Any]) -> Table:
    """Rich table of `snapgen_model.inspect.InspectReport.to_dict()`."""
    table = Table(title=f"{report['preset']}: {report['image_size']}px, latent {report['latent']}",
                  caption=_summary(report))
    for col, just in [("stage", "left"), ("grid", "right"), ("channels", "right"), ("params", "right"),
                      ("MACs", "right"), ("attention", "left")]:
        table.add_column(col, justify=just)
    for row in report["rows"]:
        table.add_row(row["stage"], row["resolution"], str(row["channels"]), _fmt_params(row["params"]),
                      _fmt_macs(row["macs"]), row["attention"])
    return table


def inspect_markdown(report: dict[str, Any]) -> str:
    lines = [f"### {report['preset']}: {report['image_size']}px, latent {report['latent']}", "",
             "| stage | grid | channels | params | MACs | attention |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['stage']} | {r['resolution']} | {r['channels']} | {_fmt_params(r['params'])} | "
                     f"{_fmt_macs(r['macs'])} | {r['attention']} |")
    return "\n".join(lines + ["", _summary(report)])


def curation_table(manifest: dict[str, Any]) -> Table:
    """Counts balance: input = kept + quarantined, one row per quarantine reason."""
    counts = manifest["counts"]
    table = Table(title="curation", caption=f"{len(manifest['shards'])} shards, "
                  f"{sum(s['bytes'] for s in manifest['shards']) / 1e6:.2f} MB")
    table.add_column("count")
    table.add_column("samples", justify="right")
    for key in ("input", "kept", "quarantined"):
        table.add_row(key, str(counts.get(key, 0)))
    for key, value in sorted(counts.items()):
        if key not in ("input", "kept", "quarantined"):
            table.add_row(f"  {key}", str(value))
    return table
