"""The Report: JSON for machines, a rich table for people."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _finite(obj: Any) -> Any:
    """NaN/Inf are not JSON: written as null (a run with them fails before writing; this keeps the file valid)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def dumps(report: dict) -> str:
    """report.json text: always valid JSON (allow_nan=False; non-finite numbers become null)."""
    return json.dumps(_finite(json.loads(json.dumps(report, default=str))), indent=1, allow_nan=False)


def write_json(report: dict, path: Path) -> None:
    path.write_text(dumps(report))


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def render(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table
    console = console or Console(stderr=True)
    t = Table(title=f"rewriter: {report.get('source', '')}", show_lines=False)
    for col in ("pass", "sites", "seconds", "rel. error", "cosine", "max abs", "emb. cosine"):
        t.add_column(col, justify="right" if col != "pass" else "left")
    for p in report.get("passes", []):
        m = p["metrics"]
        t.add_row(p["pass"], str(p["sites_changed"]), _fmt(p["seconds"]), _fmt(m["relative_error"]),
                  _fmt(m["cosine"]), _fmt(m["max_abs_error"]), _fmt(m.get("embedding_cosine", "-")))
    console.print(t)
    before, after = report.get("before", {}), report.get("after", {})
    if before and after:
        console.print(f"parameters {before['parameters']:,} -> {after['parameters']:,}; "
                      f"bytes {before['bytes']:,} -> {after['bytes']:,}")
    for p in report.get("passes", []):
        for note in p.get("notes", []):
            console.print(f"[yellow]{p['pass']}[/yellow]: {note}")
    if report.get("outputs"):
        console.print("wrote " + ", ".join(report["outputs"]))
