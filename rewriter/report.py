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


def _fmt3(x: Any) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def _change(before: int | None, after: int | None) -> str:
    """'-25.0%' / 'same' / '-' for a count before and after a pass."""
    if not before or after is None:
        return "-"
    if after == before:
        return "same"
    return f"{100 * (after - before) / before:+.1f}%"


def savings(report: dict) -> list[dict]:
    """Per pass, what it saved: attention FLOPs / memory ratios against exact at the calibration length and at the
    model's maximum length, parameters and bytes before and after, KV-cache bytes per token (ratio) or kept tokens;
    `nothing` holds a one-line warning when an approximation saved nothing measurable."""
    rows = []
    prev = report.get("before") or {}
    for p in report.get("passes", []):
        s = p.get("summary") or {}
        row = {"pass": p["pass"], "seq_len": (report.get("calibration") or {}).get("seq_len"),
               "max_length": s.get("max_length"),
               "flops": s.get("attention_flops_ratio"), "flops_max": s.get("attention_flops_ratio_at_max_length"),
               "memory": s.get("attention_memory_ratio"),
               "memory_max": s.get("attention_memory_ratio_at_max_length"),
               "params": (prev.get("parameters"), p.get("parameters")), "bytes": (prev.get("bytes"), p.get("bytes")),
               "kv": None, "nothing": None}
        if "kv_bytes_per_token_before" in s:
            row["kv"] = f"{s['kv_bytes_per_token_before']:,} -> {s['kv_bytes_per_token_after']:,} B"
        elif "key_channels_kept_fraction" in s:    # keys thinned, values kept
            row["kv"] = f"x{(1 + s['key_channels_kept_fraction']) / 2:.3g}"
        elif p.get("decode_only") and {"sinks", "window"} <= set(p.get("config", {})):
            row["kv"] = f"<= {p['config']['sinks'] + p['config']['window']} tokens"
        if p.get("parameters") is not None:
            prev = {"parameters": p["parameters"], "bytes": p["bytes"]}
        ratios = [r for r in (row["flops"], row["memory"], row["flops_max"], row["memory_max"]) if r is not None]
        saved_here = any(r < 1 - 1e-9 for r in (row["flops"], row["memory"]) if r is not None)
        saved_long = any(r < 1 - 1e-9 for r in (row["flops_max"], row["memory_max"]) if r is not None)
        saved_weights = any(a is not None and b is not None and b < a for a, b in (row["params"], row["bytes"]))
        if p.get("intended_change") or p.get("exact") or row["kv"] is not None or saved_weights or not p["sites_changed"]:
            pass
        elif ratios and not saved_here and saved_long:
            row["nothing"] = (f"{p['pass']} saved nothing at the calibration length {row['seq_len']}: every attention "
                              f"block is still computed (FLOPs and memory 1.0 of exact), while at {row['max_length']} "
                              f"it computes {row['flops_max']:.3g} of exact FLOPs; calibrate with --seq-len "
                              f"{row['max_length']} to measure it where it saves")
        elif not saved_here and not saved_long:
            row["nothing"] = (f"{p['pass']} saved nothing: "
                              + (f"attention FLOPs and memory are 1.0 of exact up to {row['max_length']} tokens and "
                                 if ratios else "") + "parameters and bytes are unchanged")
        rows.append(row)
    return rows


def _pair(a: float | None, b: float | None) -> str:
    if a is None:
        return "-"
    return f"{a:.3g}" if b is None else f"{a:.3g}/{b:.3g}"


def render(report: dict, console=None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table
    console = console or Console(stderr=True)
    if not console.is_terminal and console.width < 132:   # a log or a pipe: no terminal to fit, keep rows whole
        console = Console(file=console.file, width=132, force_terminal=False)
    cal = report.get("calibration") or {}
    rows = savings(report)
    L = cal.get("seq_len") or "L"
    Lmax = next((r["max_length"] for r in rows if r["max_length"]), None)
    if Lmax == L:      # calibrated at the maximum length: one number per cell
        Lmax = None
    at = f"@{L}/{Lmax}" if Lmax else f"@{L}"
    t = Table(title=f"rewriter: {report.get('source', '')}", box=box.SIMPLE_HEAD, pad_edge=False,
              caption=f"saved: attention FLOPs and memory against exact at {L} tokens (calibration)"
                      + (f" / {Lmax} (the model's maximum)" if Lmax else "") + ", parameters, bytes, KV cache per "
                      "token; cost: the output's error against the model in `vs`", caption_justify="left")
    cols = [("pass", "left"), ("sites", "right"), (f"attn FLOPs\n{at}", "right"), (f"attn mem\n{at}", "right"),
            ("params", "right"), ("bytes", "right"), ("KV/token", "right"),
            ("rel.err", "right"), ("cosine", "right"), ("emb.cos", "right"), ("vs", "left"), ("s", "right")]
    for col, justify in cols:
        t.add_column(col, justify=justify)
    for p, r in zip(report.get("passes", []), rows):
        m = p["metrics"]
        t.add_row(p["pass"], str(p["sites_changed"]), _pair(r["flops"], r["flops_max"] if Lmax else None),
                  _pair(r["memory"], r["memory_max"] if Lmax else None), _change(*r["params"]), _change(*r["bytes"]),
                  r["kv"] or "-", _fmt3(m["relative_error"]), _fmt3(m["cosine"]), _fmt3(m.get("embedding_cosine", "-")),
                  p.get("reference", "original"), f"{p['seconds']:.1f}")
    console.print(t)
    before, after = report.get("before", {}), report.get("after", {})
    if before and after:
        console.print(f"parameters {before['parameters']:,} -> {after['parameters']:,} "
                      f"({_change(before['parameters'], after['parameters'])}); bytes {before['bytes']:,} -> "
                      f"{after['bytes']:,} ({_change(before['bytes'], after['bytes'])})", highlight=False)
    if report.get("final_vs_original"):
        f = report["final_vs_original"]
        console.print(f"against the original model (adapter change included): relative error "
                      f"{_fmt(f['relative_error'])}, cosine {_fmt(f['cosine'])}", highlight=False)
    for r in rows:
        if r["nothing"]:
            console.print(f"[yellow]warning:[/yellow] {r['nothing']}", highlight=False, soft_wrap=True)
    for p in report.get("passes", []):
        for note in p.get("notes", []):
            console.print(f"[yellow]{p['pass']}[/yellow]: {note}", highlight=False)
    if report.get("outputs"):
        console.print("wrote " + ", ".join(report["outputs"]), highlight=False, soft_wrap=True)


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
