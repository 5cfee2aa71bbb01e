"""Plain installs: what the README calls optional (matplotlib for pictures, the `triton` extra for CUDA kernels) may
be missing, and the commands that would use it still run. Each case runs in a fresh interpreter in which importing
the package fails as it does when it is not installed."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# None in sys.modules: `import x` raises ModuleNotFoundError and importlib.util.find_spec("x") is None, as when x is
# not installed
BLOCK = textwrap.dedent("""
    import sys
    for name in {blocked!r}:
        sys.modules[name] = None
    sys.path.insert(0, {tests!r})
""")


def run_without(blocked: set[str], body: str) -> str:
    code = BLOCK.format(blocked=sorted(blocked), tests=str(ROOT / "tests")) + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_auto_attention_without_matplotlib(tmp_path):
    """auto-attention writes its output and says in the report that the plan picture was skipped."""
    out = tmp_path / "out"
    stdout = run_without({"matplotlib"}, f"""
        import json, sys
        from rewriter import capture, make_pass, optimize
        from conftest import tiny_model
        try:
            import matplotlib
            raise SystemExit("matplotlib imported")
        except ImportError:
            pass
        res = optimize(capture(tiny_model("bert")), [make_pass("auto-attention", {{"density": 0.9,
                       "candidates": ["window(window=4,sinks=1,block=8)"]}})], samples=4, seq_len=24, out={str(out)!r})
        print(json.dumps(res.report["passes"][0]["notes"]))
    """)
    notes = json.loads(stdout.strip().splitlines()[-1])
    assert any("auto_attention_plan.png skipped: matplotlib is not installed" in n for n in notes), notes
    assert (out / "report.json").exists() and (out / "model.pt2").exists()
    assert not (out / "auto_attention_plan.png").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["passes"][0]["notes"] == notes


def test_analyze_heatmaps_without_matplotlib(tmp_path):
    stdout = run_without({"matplotlib"}, f"""
        from rewriter import capture
        from rewriter.analysis import analyze
        from rewriter.report import heatmaps
        from conftest import model_inputs, tiny_model
        program = capture(tiny_model("gpt2"))
        result = analyze(program, model_inputs("gpt2", 2, 12), [("window", {{"window": 4}})])
        print(len(result.heads), heatmaps(result, {str(tmp_path)!r}))
    """)
    assert stdout.strip().splitlines()[-1] == "8 []"
    assert not list(tmp_path.glob("*.png"))


def test_window_pass_without_triton():
    """Without the `triton` extra, rewriter imports and an attention pass runs on the PyTorch reference."""
    stdout = run_without({"triton"}, """
        import torch
        from rewriter import capture, make_pass
        from rewriter.pipeline import Pipeline
        from conftest import model_inputs, tiny_model
        program = capture(tiny_model("bert"))
        inputs = model_inputs("bert", 2, 24)
        run = Pipeline([make_pass("window", {"window": 8})], max_error=10).run(program, inputs)
        ops = {str(n.target) for n in run.program.ep.graph.nodes}
        print("rewriter.window.default" in ops, run.report["final"]["relative_error"] < 1)
    """)
    assert stdout.strip().splitlines()[-1] == "True True"
