"""What a user sees: the error budget against the right reference, the summary table's savings and its warning,
replayable recipes, inspect of a rewritten program, and the CLI's small promises (issue 21)."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from rewriter.cli import app

runner = CliRunner()
SMALL = ["--samples", "2", "--seq-len", "32"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def flat(result) -> str:
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def adapter(tiny_folders, tmp_path_factory):
    from test_lora_merge import make_adapter
    return make_adapter(tiny_folders["bert"], tmp_path_factory.mktemp("ad") / "ad")


def _rel(ref: torch.Tensor, out: torch.Tensor, mask: torch.Tensor) -> float:
    """Relative error over real (unpadded) tokens, in float64."""
    ref, out = ref.double()[mask.bool()], out.double()[mask.bool()]
    return float((out - ref).norm() / ref.norm())


def test_budget_is_measured_after_the_adapter(tiny_folders, adapter):
    """lora-merge's change is the point: the next pass's error is against the merged model (an oracle: both
    programs run here), the adapter's own error is reported and exempt, and the API's error names max_error."""
    import rewriter
    from rewriter import make_pass
    from rewriter.calibration import calibration_inputs
    from rewriter.pipeline import ErrorBudgetExceeded
    passes = [make_pass("lora-merge", {"adapters": [str(adapter)]}), make_pass("performer", {"features": 8})]
    res = rewriter.optimize(tiny_folders["bert"], passes, samples=2, seq_len=32, max_error=10.0)
    first, second = res.report["passes"]
    assert first["reference"] == "original" and first["intended_change"]
    assert second["reference"] == "after lora-merge" and res.report["final_reference"] == "after lora-merge"
    # oracle: the merged-only program and the original, run on the same calibration inputs
    original = rewriter.load_program(tiny_folders["bert"])
    merged = rewriter.optimize(original, passes[:1], samples=2, seq_len=32).program
    inputs, _ = calibration_inputs(original, samples=2, seq_len=32, seed=0)
    ref0, ref1, out = (p.run(**inputs)[0] for p in (original, merged, res.program))
    m = inputs["attention_mask"]
    assert first["metrics"]["relative_error"] == pytest.approx(_rel(ref0, ref1, m), rel=1e-4)
    assert second["metrics"]["relative_error"] == pytest.approx(_rel(ref1, out, m), rel=1e-4)
    assert second["metrics_vs_original"]["relative_error"] == pytest.approx(_rel(ref0, out, m), rel=1e-4)
    # a budget below the adapter's own change still lets the merge through; the approximation is what it bounds
    assert first["metrics"]["relative_error"] > 1e-3
    only_merge = rewriter.optimize(original, passes[:1], samples=2, seq_len=32, max_error=1e-6)
    assert only_merge.report["final"]["relative_error"] > 1e-6
    with pytest.raises(ErrorBudgetExceeded) as e:
        rewriter.optimize(original, passes, samples=2, seq_len=32, max_error=1e-6)
    msg = str(e.value)
    assert "max_error 1e-06" in msg and "--max-error" not in msg and "against the model after lora-merge" in msg
    assert "raise max_error, or lower the pass's saving" in msg


def test_summary_leads_with_savings_and_warns_when_nothing_was_saved(tiny_folders, tmp_path):
    out = tmp_path / "out"
    r = run("optimize", tiny_folders["bert"], "--pass", "window:window=16,sinks=2", "--pass", "lowrank:ratio=0.5",
            "-o", out, *SMALL)
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    win, low = rep["passes"]
    # window 16 at 32 tokens in 64-token blocks computes every block: nothing saved, and one line says so
    assert win["summary"]["attention_flops_ratio"] == 1.0
    text = flat(r)
    assert "warning: window saved nothing" in text and text.count("saved nothing") == 1
    # the lowrank row shows the parameters it removed, as counted in the report
    change = 100 * (low["parameters"] - win["parameters"]) / win["parameters"]
    assert change < -10 and f"{change:+.1f}%" in text
    for header in ("attn FLOPs", "attn mem", "params", "bytes", "KV/token", "rel.err", "vs"):
        assert header in text
    assert "wrote" in text and str(out / "model.pt2") in text


def test_summary_shows_attention_savings_at_both_lengths(tiny_folders, tmp_path):
    """At 128 tokens (the tiny model's maximum) a 16-token window computes fewer blocks than exact: the row shows the
    report's ratios at the calibration length / the maximum, and no warning."""
    from rewriter.report import savings
    r = run("optimize", tiny_folders["bert"], "--pass", "window:window=16,sinks=0,block=16", "-o", tmp_path / "o",
            "--samples", "2", "--seq-len", "64")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    s = rep["passes"][0]["summary"]
    assert s["attention_flops_ratio"] < 1 and s["attention_flops_ratio_at_max_length"] < s["attention_flops_ratio"]
    assert s["attention_memory_ratio_at_max_length"] < 1
    row = savings(rep)[0]
    assert row["nothing"] is None
    assert f"{s['attention_flops_ratio']:.3g}/{s['attention_flops_ratio_at_max_length']:.3g}" in flat(r)
    assert "saved nothing" not in flat(r)


def test_dry_run_recipe_replays_bit_for_bit(tiny_folders, tmp_path):
    """Every field (defaults included), calibration, seed and version in the recipe; replaying it gives the same
    program as the flags did (the whitened factorisation depends on the calibration inputs: a lost --samples,
    --seq-len or --seed would show)."""
    flags = ["--pass", "lowrank:ratio=0.5,method=whitened", "--pass", "performer:features=8", "--samples", "3",
             "--seq-len", "24", "--seed", "7"]
    r = run("optimize", tiny_folders["bert"], *flags, "--dry-run")
    assert r.exit_code == 0, r.output
    rec = yaml.safe_load(r.output)
    assert rec["calibration"] == {"samples": 3, "seq_len": 24, "seed": 7}
    assert rec["rewriter_version"] and rec["passes"][1]["features"] == 8
    from dataclasses import fields
    from rewriter.pipeline import get_pass
    assert set(rec["passes"][1]) == {"pass"} | {f.name for f in fields(get_pass("performer").config_class)}
    (tmp_path / "r.yaml").write_text(r.output)
    a, b = tmp_path / "a", tmp_path / "b"
    assert run("optimize", tiny_folders["bert"], *flags, "-o", a).exit_code == 0
    r = run("optimize", tiny_folders["bert"], "--recipe", tmp_path / "r.yaml", "-o", b)
    assert r.exit_code == 0, r.output
    assert yaml.safe_load((a / "recipe.yaml").read_text()) == rec      # the run leaves the same recipe beside it
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    assert ra["calibration"] == rb["calibration"] and [p["config"] for p in ra["passes"]] == \
        [p["config"] for p in rb["passes"]]
    pa, pb = (torch.export.load(str(d / "model.pt2")) for d in (a, b))
    assert pa.graph_module.code == pb.graph_module.code
    sa, sb = pa.state_dict, pb.state_dict
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(x, y) for x, y in zip(pa.constants.values(), pb.constants.values()))
    # a different calibration seed changes the factorisation: the comparison above can fail
    c = tmp_path / "c"
    assert run("optimize", tiny_folders["bert"], *flags[:-1], "8", "-o", c).exit_code == 0
    pc = torch.export.load(str(c / "model.pt2"))
    assert not all(torch.equal(x, y) for x, y in zip(pa.constants.values(), pc.constants.values())) or \
        not all(torch.equal(sa[k], pc.state_dict[k]) for k in sa)
    # inspect lists the rewritten sites with their method and budget
    r = run("inspect", a, "--json")
    info = json.loads(r.output)
    assert [s["method"] for s in info["rewritten"]] == ["performer", "performer"]
    assert all(s["budget"]["features"] == 8 for s in info["rewritten"])
    assert info["attention"] == []
    r = run("inspect", a)
    assert "2 rewritten sites" in flat(r) and "features=8" in flat(r)


def test_onnx_export_records_its_final_path(tiny_folders, tmp_path):
    out = tmp_path / "out"
    r = run("optimize", tiny_folders["bert"], "--pass", "window:window=16", "--export", "onnx", "-o", out, *SMALL)
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["onnx"]["path"] == str(out / "model.onnx") and (out / "model.onnx").is_file()
    assert ".tmp" not in json.dumps(rep) and str(out / "model.onnx") in rep["outputs"]


def test_pickled_module_error_is_clean(tmp_path):
    from conftest import tiny_model
    f = tmp_path / "model.pt"
    torch.save(tiny_model("bert"), f)
    r = run("inspect", f)
    assert r.exit_code == 2 and "\x1b" not in r.output
    assert "it names transformers.models.bert.modeling_bert.BertModel, which loading would import and run" in flat(r)
    assert "✓" not in r.output and "✗ loading and capturing" in r.output     # the step that failed is not green


def test_failed_step_is_not_green_and_seq_len_over_positions_is_refused(tiny_folders, tmp_path):
    r = run("optimize", tiny_folders["bert"], "--pass", "window:window=16", "--seq-len", "129", "-o", tmp_path / "o")
    assert r.exit_code == 2
    assert "--seq-len 129 exceeds the 128 positions the model takes" in flat(r)
    assert "✗ loading and capturing" in r.output and "✓ loading and capturing" not in r.output
    assert not (tmp_path / "o").exists()
    r = run("analyze", tiny_folders["bert"], "--seq-len", "200")
    assert r.exit_code == 2 and "--seq-len 200 exceeds the 128 positions" in flat(r)


def test_missing_src_is_reported_before_no_passes(tmp_path):
    r = run("optimize", tmp_path / "nope", "-o", tmp_path / "o")
    assert r.exit_code == 2 and f"no such file or folder: {tmp_path / 'nope'}" in flat(r)
    assert "no passes given" not in r.output
    r = run("generate", tmp_path / "nope", "--prompt-ids", "1")
    assert r.exit_code == 2 and "no such file or folder" in flat(r)


def test_kv_output_lists_decoder_and_generate_shows_progress(tiny_folders, tmp_path):
    out = tmp_path / "out"
    r = run("optimize", tiny_folders["llama"], "--pass", "kv-window:sinks=2,window=8", "-o", out, *SMALL)
    assert r.exit_code == 0, r.output
    assert (out / "decoder").is_dir() and str(out / "decoder/") in flat(r)
    rep = json.loads((out / "report.json").read_text())
    assert str(out / "decoder/") in rep["outputs"]
    assert "<= 10 tokens" in flat(r) and "saved nothing" not in flat(r)
    r = run("generate", out, "--prompt-ids", "1,2,3", "--max-new-tokens", "2")
    assert r.exit_code == 0, r.output
    for step in ("loading", "capturing the prefill and decode programs", "generating 2 tokens"):
        assert f"✓ {step}" in r.output
    # --fused-step (the step fused by Inductor) decodes the same tokens through the kv-window ring
    ids = [json.loads(run("generate", out, "--prompt-ids", "1,2,3", "--max-new-tokens", "12", "--json", *flag).output
                      .strip().splitlines()[-1])["new_ids"] for flag in ((), ("--fused-step",))]
    assert ids[0] == ids[1] and len(ids[0][0]) == 12


def test_export_src_is_optional_and_existing_onnx_needs_force(tiny_folders, tmp_path, monkeypatch):
    import rewriter.api
    monkeypatch.setattr(rewriter.api, "default_checkpoint", lambda: tiny_folders["bert"])
    f = tmp_path / "m.onnx"
    r = run("export", "--onnx", f)
    assert r.exit_code == 0, r.output
    first = f.stat().st_mtime_ns
    r = run("export", "--onnx", f)
    assert r.exit_code == 2 and "already exists" in flat(r) and "--force" in flat(r)
    assert f.stat().st_mtime_ns == first
    r = run("export", tiny_folders["bert"], "--onnx", f, "--force")
    assert r.exit_code == 0, r.output
