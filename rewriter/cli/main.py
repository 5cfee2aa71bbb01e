"""rewriter optimize | inspect | analyze | export | generate | passes."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..errors import RewriterError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Rewrite pretrained transformers into cheaper programs, verified against the original.")
err = Console(stderr=True)
out = Console()


class Steps:
    """Progress for long work: a spinner on the current step, a line with its time when it ends."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.status = None
        self.current = None
        self.t0 = 0.0

    def __call__(self, msg: str) -> None:
        if self.quiet:
            return
        self._finish()
        self.current, self.t0 = msg, time.perf_counter()
        if self.status is None:
            self.status = err.status(msg)
            self.status.start()
        else:
            self.status.update(msg)

    def _finish(self) -> None:
        if self.current is not None:
            err.print(f"[green]✓[/green] {self.current} [dim]({time.perf_counter() - self.t0:.1f}s)[/dim]",
                      soft_wrap=True)   # one line per step, whatever the width
            self.current = None

    def close(self) -> None:
        self._finish()
        if self.status is not None:
            self.status.stop()
            self.status = None


def _fail(e: RewriterError) -> None:
    err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def optimize(
    src: Optional[str] = typer.Argument(None, help="HF model folder or rewriter output (default: all-MiniLM-L6-v2)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="output folder"),
    adapter: list[str] = typer.Option([], "--adapter", help="PEFT adapter folder (implies lora-merge); repeatable"),
    pass_: list[str] = typer.Option([], "--pass", help="NAME[:key=val,...]; repeatable, run in order"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="recipe file (YAML/TOML)"),
    max_error: Optional[float] = typer.Option(None, "--max-error", help="abort if the output's relative error exceeds this"),
    calib: Optional[Path] = typer.Option(None, "--calib", help="calibration text file (default: pydoc topics)"),
    samples: int = typer.Option(8, "--samples", help="calibration sequences"),
    seq_len: int = typer.Option(128, "--seq-len", help="calibration sequence length (tokens)"),
    seed: int = typer.Option(0, "--seed"),
    export: Optional[str] = typer.Option(None, "--export", help="also export: onnx"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty output folder"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the recipe the flags build, then stop"),
    json_out: bool = typer.Option(False, "--json", help="print report.json to stdout"),
    allow_unused: bool = typer.Option(False, "--allow-unused-weights",
                                      help="accept a checkpoint with tensors the model does not use"),
):
    """Run passes on SRC, verify against the original, write OUT/ (model.pt2, report.json, hf/ when weight-only)."""
    from ..api import optimize as run_optimize
    from ..api import Recipe, parse_pass_flag
    from ..api import render
    steps = Steps(quiet=json_out)
    try:
        rec = Recipe.from_file(recipe) if recipe else Recipe()
        flags = [parse_pass_flag(s) for s in pass_]
        rec.passes.extend(flags)
        if adapter:
            merges = [p for p in rec.passes if p.name == "lora-merge"]
            if merges:
                for p in merges:
                    if not p.config.adapters:
                        p.config.adapters = list(adapter)
            else:
                from ..api import make_pass
                rec.passes.insert(0, make_pass("lora-merge", {"adapters": list(adapter)}))
        for p in rec.passes:
            if p.name == "lora-merge":
                p.config.validate()
        if max_error is not None:
            rec.max_error = max_error
        cal = dict(rec.calibration)
        if calib is not None:
            cal["file"] = str(calib)
        if src is None:
            from ..api import default_checkpoint
            src = str(default_checkpoint())
        planning = [p for p in rec.passes if p.plans and not p.config.plan]
        if dry_run and not planning:
            out.print(rec.to_yaml(), end="", highlight=False)
            return
        if not rec.passes:
            raise RewriterError("no passes given", "add --pass NAME, --adapter DIR or --recipe FILE (see `rewriter passes`)")
        if export not in (None, "onnx"):
            raise RewriterError(f"unknown export format {export!r}", "use --export onnx")
        result = run_optimize(src, rec.passes, out=None if dry_run else output, force=force, calib_file=cal.get("file"),
                              samples=int(cal.get("samples", samples)), seq_len=int(cal.get("seq_len", seq_len)),
                              seed=int(cal.get("seed", seed)), max_error=rec.max_error,
                              export_onnx=export == "onnx", progress=steps, allow_unused=allow_unused)
        steps.close()
        if dry_run:   # planning passes have filled in their plans: the recipe replays them without analysis
            out.print(rec.to_yaml(), end="", highlight=False)
            return
        if json_out:
            from ..api import dumps
            print(dumps(result.report))
        else:
            render(result.report, err)
    except RewriterError as e:
        steps.close()
        _fail(e)
    finally:
        steps.close()


@app.command()
def inspect(src: Optional[str] = typer.Argument(None, help="HF model folder or rewriter output (default: MiniLM)"),
            json_out: bool = typer.Option(False, "--json", help="machine-readable output")):
    """List the attention and linear sites rewriter finds in SRC."""
    from rich.table import Table
    from ..api import inspect as run_inspect
    steps = Steps(quiet=json_out)
    try:
        if src is None:
            from ..api import default_checkpoint
            src = str(default_checkpoint())
        steps("loading and capturing")
        info = run_inspect(src)
        steps.close()
    except RewriterError as e:
        steps.close()
        _fail(e)
    if json_out:
        print(json.dumps(info, indent=1))
        return
    t = Table(title=f"{len(info['attention'])} attention sites")
    for col in ("module", "layer", "heads", "kv heads", "head dim", "causal", "mask", "scale", "model's own"):
        t.add_column(col, overflow="fold")
    for s in info["attention"]:
        own = [f"window {s['window']}" if s.get("window") is not None else "",
               f"right window {s['window_right']}" if s.get("window_right") is not None else "",
               "ALiBi" if s.get("alibi_slopes") else "", s.get("semantics_note", "")]
        t.add_row(s["module_path"], str(s["layer"]), str(s["heads"]), str(s["kv_heads"]), str(s["head_dim"]),
                  str(s["causal"]), str(s["has_mask"]), f"{s['scale']:.4g}", ", ".join(p for p in own if p) or "-")
    out.print(t)
    t = Table(title=f"{len(info['linear'])} linear sites")
    for col in ("module", "layer", "in", "out", "bias", "stored"):
        t.add_column(col, overflow="fold")
    for s in info["linear"]:
        t.add_row(s["module_path"], str(s["layer"]), str(s["in_features"]), str(s["out_features"]),
                  str(s["bias"] is not None), "in x out (Conv1D)" if s["transposed"] else "out x in")
    out.print(t)
    c = info["canonicalized"]
    out.print(f"{info['model_class']}: {info['parameters']:,} parameters; canonicalised {c['eager_attention']} eager "
              f"attention chain(s), {c['gqa']} GQA repeat_kv")
    for u in c.get("unmatched_attention") or []:
        out.print(f"[yellow]attention-like subgraph not matched at {u['module_path'] or u['node']}: {u['reason']} "
                  f"(seen: {u['seen']}); no pass can rewrite it[/yellow]")


@app.command()
def analyze(src: Optional[str] = typer.Argument(None, help="HF model folder or rewriter output (default: MiniLM)"),
            output: Optional[Path] = typer.Option(None, "-o", "--output", help="folder for analysis.json and PNGs"),
            calib: Optional[Path] = typer.Option(None, "--calib", help="calibration text file"),
            samples: int = typer.Option(4, "--samples"), seq_len: int = typer.Option(512, "--seq-len"),
            seed: int = typer.Option(0, "--seed"), force: bool = typer.Option(False, "--force"),
            json_out: bool = typer.Option(False, "--json")):
    """Per layer and head: entropy, recall of top-k / window / sinks, rank, and every method's error at a few budgets."""
    from rich.table import Table
    from ..api import analyze as run_analyze, candidate_label, heatmaps
    from ..api import load_program
    from ..api import calibration_inputs, read_texts
    steps = Steps(quiet=json_out)
    try:
        if src is None:
            from ..api import default_checkpoint
            src = str(default_checkpoint())
        if output is not None:
            from ..api import check_output_dir
            check_output_dir(output, force, [src] + ([calib] if calib else []))
        steps("loading and capturing")
        program = load_program(src)
        steps("building calibration inputs")
        inputs, desc = calibration_inputs(program, texts=read_texts(calib) if calib else None, samples=samples,
                                          seq_len=seq_len, seed=seed)
        result = run_analyze(program, inputs, progress=steps)
        data = {"source": program.source, "calibration": desc, **result.to_json()}
        if output is not None:
            from ..api import staged_output
            steps("writing analysis.json and heatmaps")
            with staged_output(output, force, [src] + ([calib] if calib else [])) as tmp:
                from ..api import dumps
                (tmp / "analysis.json").write_text(dumps(data))   # valid JSON: NaN/Inf become null
                data["pictures"] = heatmaps(result, tmp)
        steps.close()
    except RewriterError as e:
        steps.close()
        _fail(e)
    if json_out:
        print(json.dumps(data, indent=1, default=str))
        return
    t = Table(title=f"attention heads ({desc})")
    for col in ("layer", "head", "norm. entropy", "top16", "window64", "sink4", "stable rank", "best method (error)"):
        t.add_column(col, justify="right")
    for h in result.heads:
        cands = result.candidates[h["module_path"]]
        best = min(cands, key=lambda c: c.errors[h["head"]]) if cands else None
        t.add_row(str(h["layer"]), str(h["head"]), f"{h['normalized_entropy']:.3f}", f"{h['top16_recall']:.3f}",
                  f"{h['window64_recall']:.3f}", f"{h['sink4_recall']:.3f}", f"{h['stable_rank']:.1f}",
                  f"{candidate_label(best.method, best.options)} ({best.errors[h['head']]:.3f})" if best else "-")
    out.print(t)
    if output is not None:
        out.print(f"wrote {output / 'analysis.json'} and {len(data['pictures'])} heatmaps")
        if not data["pictures"]:
            from ..api import PLOTS_SKIPPED
            out.print("heatmaps skipped: " + PLOTS_SKIPPED.format(what="them"))


@app.command("export")
def export_cmd(src: str = typer.Argument(..., help="HF model folder or rewriter output"),
               onnx: Path = typer.Option(..., "--onnx", help="output .onnx file"),
               atol: float = typer.Option(1e-4, "--atol", help="max abs difference onnxruntime vs PyTorch"),
               json_out: bool = typer.Option(False, "--json", help="print the validation record")):
    """Export SRC to ONNX (batch and sequence stay dynamic), validated in onnxruntime at three shapes."""
    from ..api import load_program
    from ..api import check_src_out, export_program
    steps = Steps(quiet=json_out)
    try:
        check_src_out([src], onnx)   # the .onnx (and its external data) may not land inside the input
        steps("loading and capturing")
        program = load_program(src)
        steps("exporting and validating ONNX")
        info = export_program(program, onnx, atol=atol)
        steps.close()
    except RewriterError as e:
        steps.close()
        _fail(e)
    if json_out:
        print(json.dumps(info, indent=1))
        return
    out.print(f"wrote {info['path']}: onnxruntime matches PyTorch within {atol:g} at {len(info['checks'])} shapes "
              f"(max abs diff {info['max_abs_diff']:.3g})" + ("; quadratic ops: " + ", ".join(info["quadratic_ops"])
                                                              if info["quadratic"] else ""))


@app.command()
def generate(
    src: str = typer.Argument(..., help="HF decoder LM folder (llama, mistral, qwen2, gpt2), or a `rewriter optimize` "
                                        "output of one written with think / kv-window (its KV policy applies)"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="prompt text (needs a tokenizer in SRC)"),
    prompt_ids: Optional[str] = typer.Option(None, "--prompt-ids", help="prompt token ids, e.g. 1,2,3"),
    max_new_tokens: int = typer.Option(20, "--max-new-tokens"),
    pass_: list[str] = typer.Option([], "--pass", help="think[:ratio=..,mode=static|dynamic] and/or "
                                  "kv-window[:sinks=..,window=..], or mla[:ratio=..] alone (HF folders only)"),
    max_len: Optional[int] = typer.Option(None, "--max-len", help="decode cache slots (default: prompt + new)"),
    json_out: bool = typer.Option(False, "--json", help="print ids, text and KV bytes as JSON"),
):
    """Greedy generation with the captured prefill/decode programs and their explicit KV cache."""
    from ..api import generate as run_generate
    from ..api import parse_pass_flag
    try:
        ids = None
        if prompt_ids is not None:
            try:
                ids = [int(t) for t in prompt_ids.split(",") if t.strip()]
            except ValueError:
                raise RewriterError(f"--prompt-ids must be comma-separated integers; got {prompt_ids!r}") from None
        passes = [parse_pass_flag(s) for s in pass_]
        try:
            res = run_generate(src, prompt=prompt, prompt_ids=ids, max_new_tokens=max_new_tokens, passes=passes,
                               max_len=max_len)
        except ValueError as e:
            raise RewriterError(str(e)) from None
    except RewriterError as e:
        _fail(e)
    if json_out:
        print(json.dumps({"ids": res.ids.tolist(), "new_ids": res.new_ids.tolist(), "text": res.text, "kv": res.kv}))
        return
    if res.text is not None:
        out.print(res.text[0], highlight=False)
    else:
        out.print(",".join(str(t) for t in res.new_ids[0].tolist()), highlight=False)
    kv = res.kv
    err.print(f"KV cache: {kv['before']['bytes_per_token']} -> {kv['after']['bytes_per_token']} bytes/token, "
              f"{kv['before']['bytes_per_sequence']} -> {kv['after']['bytes_per_sequence']} bytes/sequence "
              f"({kv['tokens']} tokens, {kv['dtype']})")


@app.command("passes")
def list_passes(json_out: bool = typer.Option(False, "--json")):
    """Every pass with its config fields, types and defaults."""
    from ..api import describe_fields
    from ..api import PASSES, get_pass
    get_pass("lora-merge")  # registers built-ins
    info = {name: {"summary": cls.summary, "weight_only": cls.weight_only, "fields": describe_fields(cls.config_class)}
            for name, cls in sorted(PASSES.items())}
    if json_out:
        print(json.dumps(info, indent=1, default=str))
        return
    for name, d in info.items():
        out.print(f"[bold]{name}[/bold]  {d['summary']}")
        for f in d["fields"]:
            out.print(f"    {f['name']}: {f['type']} = {f['default']!r}  {f['help']}", highlight=False)


class Stopped(BaseException):
    """SIGINT / SIGTERM, raised in the main thread: staging folders are removed on the way out (`staged_output`
    cleans up on any BaseException). Not a KeyboardInterrupt, which typer turns into a silent exit 130."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame):
    raise Stopped(signum)


def main() -> None:
    import signal
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, _on_signal)
        except (ValueError, OSError):   # not the main thread
            pass
    try:
        app()
    except (KeyboardInterrupt, Stopped) as e:
        name = "terminated (SIGTERM)" if getattr(e, "signum", signal.SIGINT) == signal.SIGTERM else "interrupted (Ctrl-C)"
        err.print(f"{name}; nothing was written", highlight=False)
        sys.exit(128 + int(getattr(e, "signum", signal.SIGINT)))
