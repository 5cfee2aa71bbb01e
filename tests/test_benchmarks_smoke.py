"""The GPU benchmarks' CPU smoke modes run end to end (they broke silently before when decode's API moved), and
their records say what they should on a tiny fp32 model: our greedy decode equals transformers' generate, the
thinned caches are smaller, the prefill variants are timed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, out: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny", "--out", str(out), *args],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_kv_benchmark_tiny(tmp_path):
    d = run_benchmark("kv.py", tmp_path / "kv.json", "--contexts", "48", "--new-tokens", "6",
                      "--variants", "original", "think-dynamic0.5", "mla0.5", "--batches", "1", "2",
                      "--batch-contexts", "48", "--cublas-variants", "original")
    recs = {r["variant"]: r for r in d["records"] if r["batch"] == 1}
    assert set(recs) == {"transformers_generate", "original", "think-dynamic0.5", "mla0.5", "original_cublas"}
    # the step with its linears on cuBLAS (no rewriter::gemv): on the CPU the gemv ops run the same aten linears
    assert recs["original_cublas"]["agreement_with_original"]["equal_fraction"] == 1.0
    batched = {r["variant"]: r for r in d["records"] if r["batch"] == 2}
    assert set(batched) == {"transformers_generate", "original"}
    assert batched["original"]["agreement_with_transformers"]["equal_fraction"] == 1.0
    for rec in (*recs.values(), batched["original"]):   # the decode op checked against its reference before timing
        assert rec.get("kernel_check") is None or (rec["kernel_check"]["op_ok"] and rec["kernel_check"]["step_ok"])
    assert all(recs[v]["kernel_check"]["step_max_abs_diff_vs_sdpa"] == 0 for v in ("original", "think-dynamic0.5"))
    assert recs["original"]["agreement_with_transformers"]["equal_fraction"] == 1.0
    assert len(recs["original"]["tokens"]) == 6
    dense = recs["original"]["kv"]["after"]["bytes_per_token"]
    assert recs["original"]["kv"]["before"]["bytes_per_token"] == dense
    assert recs["think-dynamic0.5"]["kv"]["after"]["bytes_per_token"] == dense * 3 // 4   # keys halved
    assert recs["think-dynamic0.5"]["kv"]["after"]["bytes_per_decoded_token"] == dense    # but not after the prompt
    assert recs["mla0.5"]["kv"]["after"]["bytes_per_token"] == dense // 2
    assert recs["mla0.5"]["cache_tensor_bytes"] < recs["original"]["cache_tensor_bytes"]


def test_prefill_benchmark_tiny(tmp_path):
    # the aoti form is left out here: its two Inductor compiles took 50 of this test's 78 s; compile_output, which
    # that form calls, is tested in test_compile.py, and the H200 runs record a failed form instead of stopping
    # window_fused: a pipeline of two passes (window, then fuse), written as an output folder with its HF folder
    d = run_benchmark("prefill.py", tmp_path / "prefill.json", "--lengths", "64", "--variants", "window_fused",
                      "--reps", "1", "--forms", "eager", "hf", "--workdir", str(tmp_path / "outputs"))
    recs = {(r["variant"], r["form"]): r for r in d["records"]}     # every deployable form of every variant is timed
    assert set(recs) == {("transformers", "hf")} | {(v, f) for v in ("captured", "window_fused")
                                                    for f in ("eager", "hf")}
    assert all(r["ms"] > 0 and r["L"] == 64 for r in recs.values())
    assert recs[("transformers", "hf")]["speedup"] == 1.0
    assert d["builds"]["window_fused"]["calibration_metrics"]["cosine"] > 0.5
    pipeline = d["builds"]["window_fused"]["pass"]
    assert pipeline.startswith("window:") and " + fuse:" in pipeline


def test_stream_benchmark_tiny(tmp_path):
    d = run_benchmark("stream_8b.py", tmp_path / "stream.json", "--workdir", str(tmp_path / "work"))
    assert d["complete"] and d["blocks_done"] == d["blocks_total"] == 3
    assert d["peak_host_bytes"] > 0 and d["checkpoint_bytes"] > 0 and d["estimated_seconds_all_blocks"] > 0
    assert d["sites_changed"]["lowrank"] == 21 and d["sites_changed"]["think"] == 3
    assert d["params_before_after"][1] < d["params_before_after"][0]
    assert d["estimate_70b"]["blocks"] == 80 and d["estimate_70b"]["seconds_high"] > d["estimate_70b"]["seconds_low"]


def test_prefill_idle_gaps():
    """The profile's idle analysis on a hand-made trace: a 30 us lead, a 50 us gap before a kernel that
    rewriter::rms_norm launched after a stream sync, a 5 us gap counted in idle_ms but not listed."""
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    try:
        from prefill import idle_gaps
    finally:
        del sys.path[:2]

    def ev(cat, name, ts, dur, corr=None, tid=1):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid,
                "args": {} if corr is None else {"correlation": corr}}
    trace = {"traceEvents": [
        ev("cpu_op", "aten::linear", 0, 20), ev("cpu_op", "aten::mm", 5, 10),
        ev("cuda_runtime", "cudaLaunchKernel", 8, 2, corr=1),
        ev("kernel", "gemm", 30, 100, corr=1, tid=7),
        ev("cuda_runtime", "cudaStreamSynchronize", 25, 110),
        ev("cpu_op", "rewriter::rms_norm", 140, 40),
        ev("cuda_driver", "cuLaunchKernel", 150, 20, corr=2),
        ev("kernel", "_rms_norm_kernel", 180, 10, corr=2, tid=7),
        ev("cuda_runtime", "cudaLaunchKernel", 181, 2, corr=3),
        ev("kernel", "add", 195, 5, corr=3, tid=7),
    ]}
    out = idle_gaps(trace)
    assert out["kernels"] == 3
    assert abs(out["lead_ms"] - 0.030) < 1e-9
    assert abs(out["idle_ms"] - (0.030 + 0.050 + 0.005)) < 1e-9
    assert out["gaps"] == [{"launched_by": "rewriter::rms_norm", "gaps": 1, "ms": 0.05, "kernel": "_rms_norm_kernel"}]
    assert [s["call"] for s in out["syncs"]] == ["cudaStreamSynchronize in (no host op)"]
