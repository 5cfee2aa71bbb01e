"""Bad input: a one-line error naming the cause, a non-zero exit, and nothing written."""
import shutil

import pytest
import torch
from typer.testing import CliRunner

from rewriter.cli import app

from conftest import tiny_model

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_failure(result, out_parent, *needles):
    assert result.exit_code != 0, result.output
    text = " ".join(result.output.split())   # rich may wrap a long line; the message is one logical line
    for n in needles:
        assert n in text, text
    assert "Traceback" not in result.output
    leftovers = [p.name for p in out_parent.iterdir() if p.name.startswith(".out") or p.name == "out"]
    assert not leftovers, leftovers


@pytest.fixture()
def adapter(tiny_folders, tmp_path):
    from test_lora_merge import make_adapter
    return make_adapter(tiny_folders["bert"], tmp_path / "ad")


def test_missing_folder(tmp_path):
    r = run("optimize", tmp_path / "nope", "--pass", "lora-merge:adapters=[x]", "-o", tmp_path / "out")
    assert_clean_failure(r, tmp_path, "no such file or folder")


def test_truncated_safetensors(tiny_folders, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_folders["bert"], bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = run("optimize", bad, "--pass", "lora-merge:adapters=[x]", "-o", tmp_path / "out")
    assert_clean_failure(r, tmp_path, "corrupt or truncated safetensors", "model.safetensors")


def test_corrupt_header(tiny_folders, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_folders["bert"], bad)
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)
    r = run("inspect", bad)
    assert_clean_failure(r, tmp_path, "corrupt or truncated safetensors")


def test_adapter_for_another_base_model(tiny_folders, tmp_path, adapter):
    import transformers as tf
    other = tmp_path / "other"
    cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=120, max_position_embeddings=128, architectures=["BertModel"])
    tf.BertModel(cfg).save_pretrained(str(other))
    r = run("optimize", other, "--adapter", adapter, "-o", tmp_path / "out")
    assert_clean_failure(r, tmp_path, "does not fit", "made for another base model")


def test_adapter_for_another_architecture(tiny_folders, tmp_path, adapter):
    r = run("optimize", tiny_folders["llama"], "--adapter", adapter, "-o", tmp_path / "out")
    assert_clean_failure(r, tmp_path, "targets", "not in this model")


def test_unknown_pass(tiny_folders, tmp_path):
    r = run("optimize", tiny_folders["bert"], "--pass", "no-such-pass", "-o", tmp_path / "out")
    assert_clean_failure(r, tmp_path, "unknown pass 'no-such-pass'", "lora-merge")


def test_unknown_config_key(tiny_folders, tmp_path, adapter):
    r = run("optimize", tiny_folders["bert"], "--pass", f"lora-merge:adapters=[{adapter}],rnak=3", "-o", tmp_path / "out")
    assert_clean_failure(r, tmp_path, "no config key 'rnak'", "valid keys:", "adapters", "combination")


def test_bad_config_value(tiny_folders, tmp_path, adapter):
    r = run("optimize", tiny_folders["bert"], "--pass", f"lora-merge:adapters=[{adapter}],combination=avg",
            "-o", tmp_path / "out")
    assert_clean_failure(r, tmp_path, "combination must be one of")


def test_pickled_module_refused(tmp_path):
    model = tiny_model("bert")
    f = tmp_path / "model.pt"
    torch.save(model, f)
    r = run("inspect", f)
    assert_clean_failure(r, tmp_path, "pickled Python object", "safetensors")
    folder = tmp_path / "pickled"
    model.config.save_pretrained(str(folder))
    torch.save(model, folder / "pytorch_model.bin")
    r = run("optimize", folder, "--pass", "lora-merge:adapters=[x]", "-o", tmp_path / "out")
    assert_clean_failure(r, tmp_path, "pickled Python object")


def test_nonempty_output_needs_force(tiny_folders, tmp_path, adapter):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run("optimize", tiny_folders["bert"], "--adapter", adapter, "-o", out, "--samples", 2, "--seq-len", 8)
    assert r.exit_code != 0 and "--force" in r.output
    assert (out / "keep.txt").read_text() == "mine"


def test_error_budget_aborts_before_writing(tiny_folders, tmp_path, adapter):
    out = tmp_path / "out"
    r = run("optimize", tiny_folders["bert"], "--adapter", adapter, "--pass", "performer:features=4", "-o", out,
            "--max-error", "1e-9", "--samples", 2, "--seq-len", 8)
    assert_clean_failure(r, tmp_path, "relative error", "against the model after lora-merge", "--max-error",
                         "nothing was written", "raise --max-error, or lower the pass's saving")
    assert "lower its budget" not in r.output
    assert not out.exists()


def test_success_writes_outputs_and_dry_run_prints_recipe(tiny_folders, tmp_path, adapter):
    import yaml
    r = run("optimize", tiny_folders["bert"], "--adapter", adapter, "--max-error", "5", "--dry-run")
    assert r.exit_code == 0, r.output
    recipe = yaml.safe_load(r.output)
    assert recipe["max_error"] == 5 and recipe["passes"][0]["pass"] == "lora-merge"
    assert recipe["passes"][0]["adapters"] == [str(adapter)] and recipe["passes"][0]["combination"] == "cat"
    (tmp_path / "r.yaml").write_text(r.output)
    out = tmp_path / "out"
    r = run("optimize", tiny_folders["bert"], "--recipe", tmp_path / "r.yaml", "-o", out, "--samples", 2, "--seq-len", 8)
    assert r.exit_code == 0, r.output
    assert {p.name for p in out.iterdir()} >= {"example_inputs.safetensors", "hf", "model.pt2", "recipe.yaml",
                                               "report.json", "rewriter.json"}
    import json
    rep = json.loads((out / "report.json").read_text())
    assert rep["passes"][0]["pass"] == "lora-merge" and rep["passes"][0]["metrics"]["relative_error"] < 5
    r = run("inspect", out, "--json")        # a rewriter output inspects like a model
    assert r.exit_code == 0 and '"attention"' in r.output


def test_passes_lists_fields():
    r = run("passes")
    assert r.exit_code == 0 and "lora-merge" in r.output and "combination" in r.output
