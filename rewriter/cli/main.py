"""rewriter optimize | inspect | analyze | export | compile | generate | eval | passes."""
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
    """Progress for long work: a spinner with the elapsed time on the current step, a line with its time when it
    ends (a red cross, not a check, when it failed). Without a terminal each step prints a line as it starts."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.live = None
        self.task = None
        self.current = None
        self.t0 = 0.0

    def __call__(self, msg: str) -> None:
        if self.quiet:
            return
        self._finish(ok=True)
        self.current, self.t0 = msg, time.perf_counter()
        if not err.is_terminal:
            err.print(f"{msg} ...", highlight=False, soft_wrap=True)
            return
        if self.live is None:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
            self.live = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                 console=err, transient=True)
            self.live.start()
            self.task = self.live.add_task(msg, total=None)
        else:
            self.live.reset(self.task, description=msg)

    def _finish(self, ok: bool) -> None:
        if self.current is not None:
            mark = "[green]✓[/green]" if ok else "[red]✗[/red]"
            err.print(f"{mark} {self.current} [dim]({time.perf_counter() - self.t0:.1f}s)[/dim]",
                      highlight=False, soft_wrap=True)   # one line per step, whatever the width
            self.current = None

    def close(self, ok: bool = True) -> None:
        self._finish(ok)
        if self.live is not None:
            self.live.stop()
            self.live = None


def _fail(e: RewriterError, steps: Steps | None = None) -> None:
    if steps is not None:
        steps.close(ok=False)
    import re
    from rich.markup import escape
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(e))   # a library's terminal colour codes, never ours
    err.print(f"[red]error:[/red] {escape(text)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _default_src(src: Optional[str]) -> str:
    """SRC as given (checked to exist, before anything else is said about the command), or the embedded MiniLM."""
    if src is None:
        from ..api import default_checkpoint
        return str(default_checkpoint())
    if not Path(src).exists():
        raise RewriterError(f"no such file or folder: {src}")
    return src


@app.command()
def optimize(
    src: Optional[str] = typer.Argument(None, help="HF model folder or rewriter output (default: all-MiniLM-L6-v2)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="output folder"),
    adapter: list[str] = typer.Option([], "--adapter", help="PEFT adapter folder (implies lora-merge); repeatable"),
    pass_: list[str] = typer.Option([], "--pass", help="NAME[:key=val,...]; repeatable, run in order"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="recipe file (YAML/TOML)"),
    max_error: Optional[float] = typer.Option(None, "--max-error", help="abort if the output's relative error exceeds this"),
    calib: Optional[Path] = typer.Option(None, "--calib", help="calibration text file (default: pydoc topics)"),
    samples: Optional[int] = typer.Option(None, "--samples", help="calibration sequences [default: 8]"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="calibration sequence length in tokens [default: 128]"),
    seed: Optional[int] = typer.Option(None, "--seed", help="[default: 0]"),
    pack: bool = typer.Option(False, "--pack", help="calibration rows of exactly --seq-len tokens of passages joined "
                              "end to end (so heads that reach far back show on short texts)"),
    export: Optional[str] = typer.Option(None, "--export", help="also export: onnx"),
    onnx_target: str = typer.Option("standard", "--onnx-target",
                                    help="standard (ONNX ops only) or ort (onnxruntime's contrib attention ops where exact)"),
    compile_: bool = typer.Option(False, "--compile", help="also write OUT/model.aoti.pt2 (AOTInductor package)"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty output folder"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the recipe the flags build, then stop"),
    json_out: bool = typer.Option(False, "--json", help="print report.json to stdout"),
    allow_unused: bool = typer.Option(False, "--allow-unused-weights",
                                      help="accept a checkpoint with tensors the model does not use"),
    stream: bool = typer.Option(False, "--stream", help="layer by layer: one block's weights in memory at a time, "
                                "output as sharded safetensors (checkpoints larger than memory; torchrun for GPUs)"),
    resume: bool = typer.Option(False, "--resume", help="with --stream: continue an interrupted run of the same "
                                "settings from its last finished block"),
    device: Optional[str] = typer.Option(None, "--device", help="with --stream: where blocks are calibrated "
                                         "[default: cuda:LOCAL_RANK if CUDA, else cpu]"),
):
    """Run passes on SRC, verify against the original, write OUT/ (model.pt2, report.json, recipe.yaml, hf/ when
    weight-only; with --stream, sharded safetensors + blocks/*.pt2 + streamed.json)."""
    from ..api import optimize as run_optimize
    from ..api import Recipe, parse_pass_flag
    from ..api import render
    import os
    follower = int(os.environ.get("RANK", "0")) != 0     # torchrun: rank 0 speaks and writes
    steps = Steps(quiet=json_out or follower)
    try:
        src = _default_src(src)
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
        # calibration: a flag given here, else the recipe's value, else the default; the recipe records all of them
        from ..api import CALIBRATION_DEFAULTS
        given = {"samples": samples, "seq_len": seq_len, "seed": seed, "file": str(calib) if calib else None,
                 "pack": True if pack else None}
        cal = {**CALIBRATION_DEFAULTS, **rec.calibration, **{k: v for k, v in given.items() if v is not None}}
        rec.calibration = cal
        planning = [p for p in rec.passes if p.plans and not p.config.plan]
        if dry_run and not planning:
            out.print(rec.to_yaml(), end="", highlight=False)
            return
        if not rec.passes:
            raise RewriterError("no passes given", "add --pass NAME, --adapter DIR or --recipe FILE (see `rewriter passes`)")
        if export not in (None, "onnx"):
            raise RewriterError(f"unknown export format {export!r}", "use --export onnx")
        result = run_optimize(src, rec.passes, out=None if dry_run else output, force=force, calib_file=cal.get("file"),
                              samples=int(cal["samples"]), seq_len=int(cal["seq_len"]), seed=int(cal["seed"]),
                              max_error=rec.max_error, export_onnx=export == "onnx", progress=steps,
                              allow_unused=allow_unused, max_error_name="--max-error",
                              onnx_target=onnx_target, aoti_package=compile_ and not dry_run,
                              stream=stream, resume=resume, device=device,
                              pack=bool(cal.get("pack", False)))
        steps.close()
        if dry_run:   # planning passes have filled in their plans: the recipe replays them without analysis
            out.print(rec.to_yaml(), end="", highlight=False)
            return
        if follower:
            return
        if json_out:
            from ..api import dumps
            print(dumps(result.report))
        else:
            render(result.report, err)
    except RewriterError as e:
        _fail(e, steps)
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
        src = _default_src(src)
        steps("loading and capturing")
        info = run_inspect(src)
        steps.close()
    except RewriterError as e:
        _fail(e, steps)
    if json_out:
        print(json.dumps(info, indent=1))
        return
    rewritten = info.get("rewritten") or []
    if rewritten:
        t = Table(title=f"{len(rewritten)} rewritten sites")
        for col in ("module", "layer", "method", "budget"):
            t.add_column(col, overflow="fold")
        for s in rewritten:
            t.add_row(s["module_path"], str(s["layer"]), s["method"],
                      ", ".join(f"{k}={v}" for k, v in s["budget"].items()) or "-")
        out.print(t)
    t = Table(title=f"{len(info['attention'])} attention sites" + (" left as SDPA" if rewritten else ""))
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
        src = _default_src(src)
        if output is not None:
            from ..api import check_output_dir
            check_output_dir(output, force, [src] + ([calib] if calib else []))
        steps("loading and capturing")
        program = load_program(src)
        from ..api import check_seq_len
        check_seq_len(program, seq_len)
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
        _fail(e, steps)
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
def export_cmd(src: Optional[str] = typer.Argument(None, help="HF model folder or rewriter output (default: MiniLM)"),
               onnx: Path = typer.Option(..., "--onnx", help="output .onnx file"),
               atol: float = typer.Option(1e-4, "--atol", help="max abs difference onnxruntime vs PyTorch"),
               force: bool = typer.Option(False, "--force", help="replace an existing .onnx file"),
               onnx_target: str = typer.Option("standard", "--onnx-target", help="standard (ONNX ops only) or ort "
                                               "(onnxruntime's contrib attention ops where exact)"),
               json_out: bool = typer.Option(False, "--json", help="print the validation record")):
    """Export SRC to ONNX (batch and sequence stay dynamic), validated in onnxruntime at three shapes."""
    from ..api import load_program
    from ..api import check_src_out, export_program
    steps = Steps(quiet=json_out)
    try:
        src = _default_src(src)
        check_src_out([src], onnx)   # the .onnx (and its external data) may not land inside the input
        if onnx.exists() and not force:
            raise RewriterError(f"{onnx} already exists", "pass --force to replace it, or choose another path")
        if onnx.exists() and not onnx.is_file():
            raise RewriterError(f"{onnx} exists and is not a file", "choose another path")
        steps("loading and capturing")
        program = load_program(src)
        steps("exporting and validating ONNX")
        info = export_program(program, onnx, atol=atol, target=onnx_target)
        steps.close()
    except RewriterError as e:
        _fail(e, steps)
    if json_out:
        print(json.dumps(info, indent=1))
        return
    out.print(f"wrote {info['path']}: onnxruntime matches PyTorch within {atol:g} at {len(info['checks'])} shapes "
              f"(max abs diff {info['max_abs_diff']:.3g})" + ("; quadratic ops: " + ", ".join(info["quadratic_ops"])
                                                              if info["quadratic"] else "")
              + ("" if onnx_target == "standard" else "; onnxruntime contrib ops: " + (", ".join(
                  f"{n} x{c}" for n, c in info["contrib_ops"].items()) or "none (no site where one is exact)")))


@app.command("compile")
def compile_cmd(out_dir: Path = typer.Argument(..., metavar="OUT", help="a `rewriter optimize` output folder"),
                device: Optional[str] = typer.Option(None, "--device", help="compile for this device (default: the "
                                                     "program's; cuda for a GPU package)"),
                json_out: bool = typer.Option(False, "--json", help="print the compile record")):
    """Write OUT/model.aoti.pt2: an AOTInductor package of OUT's program that runs without rewriter
    (torch._inductor.aoti_load_package), checked against the program within 1e-4."""
    from ..api import compile_output
    steps = Steps(quiet=json_out)
    try:
        info = compile_output(out_dir, progress=steps, device=device)
        steps.close()
    except RewriterError as e:
        _fail(e, steps)
    if json_out:
        print(json.dumps(info, indent=1))
        return
    out.print(f"wrote {info['path']} ({info['device']}, {info['bytes'] / 1e6:.1f} MB, {info['seconds']:.0f}s): matches "
              f"the program within {info['max_abs_diff']:.2g} at {len(info['checked_shapes'])} shapes")


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
    stream: bool = typer.Option(False, "--stream", help="print the new tokens (text, or ids) as they come"),
    fused_step: bool = typer.Option(False, "--fused-step", help="fuse the decode step with Inductor before "
                                    "capturing it (compiles for seconds first; faster tokens after)"),
):
    """Greedy generation with the captured prefill/decode programs and their explicit KV cache."""
    from ..api import generate as run_generate
    from ..api import parse_pass_flag
    steps = Steps(quiet=json_out)
    try:
        if not Path(src).exists():
            raise RewriterError(f"no such file or folder: {src}")
        ids = None
        if prompt_ids is not None:
            try:
                ids = [int(t) for t in prompt_ids.split(",") if t.strip()]
            except ValueError:
                raise RewriterError(f"--prompt-ids must be comma-separated integers; got {prompt_ids!r}") from None
        passes = [parse_pass_flag(s) for s in pass_]
        try:
            res = run_generate(src, prompt=prompt, prompt_ids=ids, max_new_tokens=max_new_tokens, passes=passes,
                               max_len=max_len, stream=(lambda s: print(s, end="", flush=True)) if stream else None,
                               progress=None if stream else steps,   # streamed text and a spinner do not mix
                               fused_step=fused_step)
        except ValueError as e:
            raise RewriterError(str(e)) from None
        steps.close()
    except RewriterError as e:
        _fail(e, steps)
    if stream:
        print()
    if json_out:
        print(json.dumps({"ids": res.ids.tolist(), "new_ids": res.new_ids.tolist(), "text": res.text, "kv": res.kv}))
        return
    if not stream:
        out.print(res.text[0] if res.text is not None else ",".join(str(t) for t in res.new_ids[0].tolist()),
                  highlight=False)
    kv = res.kv
    decoded = kv["after"].get("bytes_per_decoded_token")     # dynamic think: keys after the prompt at full width
    err.print(f"KV cache: {kv['before']['bytes_per_token']} -> {kv['after']['bytes_per_token']} bytes/token"
              + (f" ({decoded} per token after the prompt)" if decoded is not None else "") + ", "
              f"{kv['before']['bytes_per_sequence']} -> {kv['after']['bytes_per_sequence']} bytes/sequence "
              f"({kv['tokens']} tokens, {kv['dtype']})")


@app.command("eval")
def eval_cmd(
    src: Optional[str] = typer.Argument(None, help="HF folder or rewriter output (default: the shipped decoder; "
                                                   "MiniLM for --task embedding)"),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="the model to compare with (default for a "
                                           "rewriter output: the folder it was made from)"),
    task: str = typer.Option("perplexity", "--task", help="perplexity | retrieval | embedding"),
    text: Optional[Path] = typer.Option(None, "--text", help="UTF-8 text file or folder (default: the decoder's "
                                        "held-out files; pydoc topics for embedding)"),
    lengths: Optional[str] = typer.Option(None, "--lengths", help="comma-separated: perplexity windows, passkey "
                                          "distances or embedding lengths (tokens)"),
    trials: int = typer.Option(10, "--trials", help="passkey trials per distance"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="score at most this many tokens of text"),
    seed: int = typer.Option(1234, "--seed"),
    out_file: Optional[Path] = typer.Option(None, "--out", help="write the result here (.json) and a plot beside it"),
    json_out: bool = typer.Option(False, "--json", help="print the result as JSON"),
):
    """Perplexity, passkey retrieval or embedding cosine of SRC, beside its baseline."""
    from ..api import evaluate as run_evaluate
    steps = Steps(quiet=json_out)
    try:
        ns = None
        if lengths is not None:
            try:
                ns = [int(t) for t in lengths.split(",") if t.strip()]
            except ValueError:
                raise RewriterError(f"--lengths must be comma-separated integers; got {lengths!r}") from None
            if not ns:
                raise RewriterError("--lengths is empty")
        try:
            res = run_evaluate(src, baseline, task=task, text=text, lengths=ns, trials=trials, max_tokens=max_tokens,
                               seed=seed, out=out_file, progress=steps)
        except ValueError as e:
            raise RewriterError(str(e)) from None
        steps.close()
    except RewriterError as e:
        _fail(e, steps)
    if json_out:
        print(json.dumps(res, indent=1))
        return
    key = {"perplexity": "perplexity", "retrieval": "accuracy"}.get(res["task"])
    for r in res["rows"]:
        if key is None:
            out.print(f"{r['length']} tokens: cosine mean {r['cosine_mean']:.5f}, min {r['cosine_min']:.5f} "
                      f"({r['texts']} texts)", highlight=False)
        else:
            cols = [f"{name} {r[name][key]:.4g}" for name in ("src", "baseline") if name in r]
            out.print(f"{r['length']}: " + ", ".join(cols), highlight=False)
    if out_file is not None:
        out.print(f"wrote {out_file}" + (f" and {res['plot']}" if res.get("plot") else f" ({res.get('plot_note')})"),
                  highlight=False)


@app.command("passes")
def list_passes(json_out: bool = typer.Option(False, "--json")):
    """Every pass with its config fields, types and defaults."""
    from ..api import describe_fields
    from ..api import PASSES, get_pass
    get_pass("lora-merge")  # registers built-ins
    info = {name: {"summary": cls.summary, "weight_only": cls.weight_only,
                   "streams": cls.streaming or True, "splits_calibration": cls.distributed or True,
                   "fields": describe_fields(cls.config_class)}
            for name, cls in sorted(PASSES.items())}
    if json_out:
        print(json.dumps(info, indent=1, default=str))
        return
    for name, d in info.items():
        out.print(f"[bold]{name}[/bold]  {d['summary']}")
        streams = "yes" if d["streams"] is True else f"no ({d['streams']})"
        if d["streams"] is True and d["splits_calibration"] is not True:
            streams += f"; one process only ({d['splits_calibration']})"
        out.print(f"    layer by layer (--stream): {streams}", highlight=False)
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
        err.print(f"{name}; nothing was written to the output folder", highlight=False)
        sys.exit(128 + int(getattr(e, "signum", signal.SIGINT)))
