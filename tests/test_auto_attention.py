"""auto-attention: allocation limits on tiny models, the plan as a replayable recipe, and analyze's outputs."""
import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

import rewriter
from rewriter import make_pass, optimize
from rewriter.cli import app

from conftest import model_inputs, tiny_model

CANDIDATES = ["window(window=4,sinks=1,block=8)", "performer(features=8)", "linear(feature_map=elu)",
              "scatterbrain(window=4,features=8)"]


@pytest.fixture(scope="module")
def sharp_bert():
    """Tiny BERT with sharpened queries/keys, so heads are far from uniform and methods differ."""
    model = tiny_model("bert", seed=3)
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.attention.self.query.weight.mul_(6)
            layer.attention.self.key.weight.mul_(6)
    return rewriter.capture(model)


def test_tight_target_keeps_everything_exact(sharp_bert):
    res = optimize(sharp_bert, [make_pass("auto-attention", {"max_error": 1e-9, "candidates": CANDIDATES})],
                   samples=4, seq_len=24)
    s = res.report["passes"][0]["summary"]
    assert s["heads_by_method"] == {"exact": 8} and s["attention_flops_ratio"] == 1.0
    assert res.report["final"]["relative_error"] < 1e-6


def test_loose_target_picks_cheaper_methods_and_verifies(sharp_bert):
    res = optimize(sharp_bert, [make_pass("auto-attention", {"max_error": 0.5, "candidates": CANDIDATES})],
                   samples=4, seq_len=24)
    s = res.report["passes"][0]["summary"]
    assert s["attention_flops_ratio"] < 1.0
    assert s["heads_by_method"].get("exact", 0) < 8
    assert s["predicted"]["relative_error"] <= 0.5
    # held-out verification is measured and reported next to the prediction
    assert 0 <= s["measured_holdout"]["relative_error"] < 5
    assert abs(res.report["final"]["relative_error"] - s["predicted"]["relative_error"]) < 1.0


def test_density_target_meets_flops_budget(sharp_bert):
    res = optimize(sharp_bert, [make_pass("auto-attention", {"density": 0.8, "candidates": CANDIDATES})],
                   samples=4, seq_len=24)
    s = res.report["passes"][0]["summary"]
    assert s["attention_flops_ratio"] <= 0.8 + 1e-9
    # more budget can only lower the predicted error
    res2 = optimize(sharp_bert, [make_pass("auto-attention", {"density": 0.95, "candidates": CANDIDATES})],
                    samples=4, seq_len=24)
    assert res2.report["passes"][0]["summary"]["predicted"]["relative_error"] <= s["predicted"]["relative_error"] + 1e-9


def test_plan_round_trips_as_recipe(tiny_folders, tmp_path):
    runner = CliRunner()
    cands = "[" + ",".join(CANDIDATES) + "]"
    r = runner.invoke(app, ["optimize", str(tiny_folders["bert"]), "--pass",
                            f"auto-attention:max_error=0.3,candidates={cands}", "--samples", "4", "--seq-len", "24",
                            "--dry-run"])
    assert r.exit_code == 0, r.output
    recipe = yaml.safe_load(r.output[r.output.index("rewriter: 1"):])
    plan = recipe["passes"][0]["plan"]
    assert len(plan) == 2 and all(len(e["heads"]) == 4 for e in plan)
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    r = runner.invoke(app, ["optimize", str(tiny_folders["bert"]), "--recipe", str(tmp_path / "plan.yaml"), "-o",
                            str(out), "--samples", "4", "--seq-len", "24"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["passes"][0]["summary"]["replayed_plan"] is True
    assert [s["heads"] for s in rep["passes"][0]["sites"]] == [e["heads"] for e in plan]
    program = rewriter.load_program(out)
    inputs = model_inputs("bert", 2, 31)
    assert torch.isfinite(program.run(**inputs)[0]).all()


def test_plan_picture_written(sharp_bert, tmp_path):
    res = optimize(sharp_bert, [make_pass("auto-attention", {"density": 0.9, "candidates": CANDIDATES})],
                   samples=4, seq_len=24, out=tmp_path / "o")
    png = (tmp_path / "o" / "auto_attention_plan.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_writes_json_and_heatmaps(tiny_folders, tmp_path):
    runner = CliRunner()
    out = tmp_path / "an"
    r = runner.invoke(app, ["analyze", str(tiny_folders["gpt2"]), "-o", str(out), "--samples", "2", "--seq-len", "40"])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "analysis.json").read_text())
    assert len(data["heads"]) == 8
    h = data["heads"][0]
    assert 0 <= h["normalized_entropy"] <= 1 + 1e-9
    assert h["top1_recall"] <= h["top4_recall"] <= h["top16_recall"] <= 1 + 1e-9
    assert 1 <= h["stable_rank"] and h["rank90"] <= h["rank99"]
    assert all(len(c["errors"]) == 4 for cs in data["candidates"].values() for c in cs)
    assert sorted(p.name for p in out.glob("*.png"))


def test_bad_targets_rejected():
    with pytest.raises(rewriter.RewriterError, match="exactly one target"):
        make_pass("auto-attention", {"density": 0.5, "max_error": 0.1})


def test_recall_probe_repeats_first_half_of_real_tokens():
    from rewriter.passes.auto_attention import recall_probe
    ids = torch.arange(20).view(2, 10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0                                  # left padding stays where it is
    inputs = {"input_ids": ids, "attention_mask": mask}
    out = recall_probe(inputs)
    assert out["input_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    assert out["input_ids"][1].tolist() == [10, 11, 12, 13, 14, 15, 16, 14, 15, 16]
    assert out["attention_mask"] is mask and ids[0].tolist() == list(range(10))   # the input is not modified


def test_recall_probe_is_analysed_and_reported(sharp_bert):
    runs = {}
    for probe in (True, False):
        res = optimize(sharp_bert, [make_pass("auto-attention", {"density": 0.8, "candidates": CANDIDATES,
                                                                 "recall_probe": probe})], samples=4, seq_len=24)
        runs[probe] = res.report["passes"][0]["summary"]
    assert runs[True]["recall_probes"] == runs[True]["fit_samples"] == 2 and runs[False]["recall_probes"] == 0
    assert runs[True]["attention_flops_ratio"] <= 0.8 + 1e-9
    # the probes change what the heads are measured on
    assert runs[True]["per_site"] != runs[False]["per_site"]


def test_packed_calibration_fills_every_row():
    """pack=True: passages joined into full-length rows (no padding), so auto-attention plans at that length."""
    from pathlib import Path
    from rewriter.calibration import calibration_inputs
    program = rewriter.load_program(Path(rewriter.__file__).parent / "data" / "decoder")
    inputs, desc = calibration_inputs(program, samples=2, seq_len=700, seed=0, pack=True)
    assert inputs["input_ids"].shape == (2, 700) and bool(inputs["attention_mask"].all())
    assert "packed" in desc
    again, _ = calibration_inputs(program, samples=2, seq_len=700, seed=0, pack=True)
    assert torch.equal(again["input_ids"], inputs["input_ids"])
    plain, _ = calibration_inputs(program, samples=2, seq_len=700, seed=0)
    assert not bool(plain["attention_mask"].all())          # pydoc pages are shorter: padded without pack


def test_recall_probe_without_token_ids_is_noted():
    """Image models have no token ids to repeat: the plan is made on the samples alone and the report says so."""
    vit = rewriter.capture(tiny_model("vit"))
    res = optimize(vit, [make_pass("auto-attention", {"density": 0.9, "candidates": CANDIDATES[:2],
                                                      "recall_probe": True})], samples=4)
    entry = res.report["passes"][0]
    assert entry["summary"]["recall_probes"] == 0
    assert any("recall_probe skipped" in n for n in entry["notes"])
