"""The Report: JSON for machines, a rich table for people, plots where people would rather look."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable


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


PLOTS_SKIPPED = "matplotlib is not installed, so no picture was drawn (pip install matplotlib to get {what})"


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed (a plain install: plots are
    optional, and a missing picture is noted in the report instead of failing the run)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plan_picture(plan: dict[str, list[tuple[str, dict]]], layers: dict[str, int | None],
                 colour: Callable[[str], str]) -> bytes | None:
    """auto-attention's plan as a layer x head grid coloured by method (colour(method)), each cell labelled with its
    budget; plan: per site path, (method, options) per head. PNG bytes, or None without matplotlib."""
    import io
    plt = _pyplot()
    if plt is None:
        return None
    from matplotlib.patches import Patch
    rows = sorted(plan, key=lambda p: (layers[p] if layers[p] is not None else -1, p))
    n_heads = max(len(v) for v in plan.values())
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * n_heads, 1 + 0.55 * len(rows)))
    for r, path in enumerate(rows):
        for h, (method, opts) in enumerate(plan[path]):
            ax.add_patch(plt.Rectangle((h, r), 1, 1, color=colour(method)))
            short = ",".join(f"{k[:1]}{v}" for k, v in opts.items() if k in ("window", "features", "density", "stride",
                                                                                  "n_hashes"))
            ax.text(h + 0.5, r + 0.5, short, ha="center", va="center", fontsize=6)
    ax.set_xlim(0, n_heads)
    ax.set_ylim(len(rows), 0)
    ax.set_xticks([h + 0.5 for h in range(n_heads)], [str(h) for h in range(n_heads)])
    ax.set_yticks([r + 0.5 for r in range(len(rows))], [str(layers[p]) for p in rows])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    used = sorted({method for v in plan.values() for method, _ in v})
    ax.legend(handles=[Patch(color=colour(m), label=m) for m in used],
              loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)
    ax.set_title("auto-attention plan (w: window, f: features, d: density, s: stride, n: hashes)", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def heatmaps(analysis, folder, keys=("normalized_entropy", "top16_recall", "window64_recall",
                                                "sink4_recall", "stable_rank")) -> list[str]:
    """Layer x head heatmaps of an Analysis (rewriter.analysis) as PNG files in `folder`; returns their names (none
    without matplotlib)."""
    import torch
    plt = _pyplot()
    if plt is None:
        return []
    folder = Path(folder)
    layers = sorted({h["layer"] for h in analysis.heads if h["layer"] is not None})
    n_heads = max(h["head"] for h in analysis.heads) + 1
    written = []
    for key in keys:
        grid = torch.full((len(layers), n_heads), float("nan"))
        for h in analysis.heads:
            if h["layer"] is not None:
                grid[layers.index(h["layer"]), h["head"]] = h[key]
        fig, ax = plt.subplots(figsize=(1 + 0.45 * n_heads, 1 + 0.4 * len(layers)))
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), [str(x) for x in layers])
        ax.set_title(key.replace("_", " "))
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        name = f"heads_{key}.png"
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written
