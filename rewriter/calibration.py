"""Calibration inputs (real text by default) and the error metrics every run reports."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from .errors import RewriterError
from .program import Program


def default_texts() -> list[str]:
    """Real English prose that ships with Python: the pydoc topic pages."""
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)]


def read_texts(path: str | Path) -> list[str]:
    p = Path(path)
    if p.is_dir():
        raise RewriterError(f"calibration file {p} is a folder", "pass a UTF-8 text file (blank lines separate passages)")
    if not p.is_file():
        raise RewriterError(f"calibration file not found: {p}", "pass a UTF-8 text file (blank lines separate passages)")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise RewriterError(f"cannot read calibration file {p}: {e.strerror}") from None
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") + text.count("\x00")
    if bad > max(8, len(text) // 100):
        raise RewriterError(f"calibration file {p} is not UTF-8 text ({bad} undecodable or NUL characters)",
                            "pass a UTF-8 text file (blank lines separate passages)")
    passages = [t.strip() for t in text.split("\n\n") if t.strip()]
    if not passages:
        raise RewriterError(f"calibration file {p} is empty")
    return passages


MAX_SAMPLES = 4096
MAX_SEQ_LEN = 1 << 20


def check_calibration_args(samples, seq_len, seed=0) -> None:
    from .safety import check_number
    check_number("--samples", samples, integer=True, minimum=1, maximum=MAX_SAMPLES)
    check_number("--seq-len", seq_len, integer=True, minimum=1, maximum=MAX_SEQ_LEN)
    check_number("--seed", seed, integer=True, minimum=0, maximum=2**63 - 1)


def calibration_inputs(program: Program, *, texts: list[str] | None = None, samples: int = 8, seq_len: int = 128,
                       seed: int = 0, pack: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """Returns (inputs, description). Text models use the model's tokenizer on real text (seeded choice of
    passages, truncated to seq_len, padded to the longest); without a tokenizer, seeded random ids.
    pack: passages (in seeded order) are joined, EOS between them, and cut into `samples` rows of exactly seq_len
    tokens, so calibration runs at the full length even when passages are shorter (what a method whose budget
    or reach depends on the length must see)."""
    check_calibration_args(samples, seq_len, seed)
    rng = random.Random(seed)
    names = program.input_names
    cfg = program.config
    lo, hi = program.dim_bounds.get("seq", (2, seq_len))
    seq_len = max(lo, min(seq_len, hi))
    if "pixel_values" in names:
        if texts is not None:
            raise RewriterError("calibration text was given but the model takes images (pixel_values)",
                                "drop --calib; image models calibrate on synthetic images")
        size = cfg.get("image_size", 224)
        ch = cfg.get("num_channels", 3)
        g = torch.Generator().manual_seed(seed)
        # No image data ships here: smooth random images (low-frequency noise) are closer to photos than white noise.
        base = torch.randn(samples, ch, max(2, size // 8), max(2, size // 8), generator=g)
        pix = torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)
        return {"pixel_values": pix}, f"{samples} synthetic smooth-noise images {size}x{size} (seed {seed})"
    tokenizer = _tokenizer(program)
    if texts is not None and tokenizer is None:
        raise RewriterError(f"calibration text was given but {program.source} has no tokenizer",
                            "add the tokenizer files to the model folder, or drop --calib (random token ids are used)")
    texts = list(texts) if texts is not None else default_texts()
    chosen = [texts[i] for i in rng.sample(range(len(texts)), k=min(samples, len(texts)))]
    while len(chosen) < samples:
        chosen.append(texts[rng.randrange(len(texts))])
    if tokenizer is not None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        padding_side = "left" if _decoder(cfg) else "right"
        tokenizer.padding_side = padding_side
        if pack:
            inputs = {"input_ids": _packed_ids(tokenizer, texts, rng, samples, seq_len)}
            desc = f"{samples} rows of {seq_len} tokens of packed real text (passages joined, seed {seed})"
        else:
            enc = tokenizer(chosen, truncation=True, max_length=seq_len, padding="longest", return_tensors="pt")
            inputs = {n: enc[n] for n in names if n in enc}
            desc = f"{samples} passages of real text, up to {seq_len} tokens ({padding_side}-padded)"
    else:
        g = torch.Generator().manual_seed(seed)
        vocab = cfg.get("vocab_size", 1000)
        inputs = {"input_ids": torch.randint(0, vocab, (samples, seq_len), generator=g)}
        mask = torch.ones(samples, seq_len, dtype=torch.long)
        for i in range(1, samples, 2):
            cut = rng.randrange(seq_len // 2, seq_len)
            if _decoder(cfg):
                mask[i, : seq_len - cut] = 0
            else:
                mask[i, cut:] = 0
        inputs["attention_mask"] = mask
        desc = f"{samples} random token sequences of {seq_len} (no tokenizer in the model folder; seed {seed})"
    for n in names:
        if n not in inputs:
            if n == "token_type_ids":
                inputs[n] = torch.zeros_like(inputs["input_ids"])
            elif n == "attention_mask":
                inputs[n] = torch.ones_like(inputs["input_ids"])
            else:
                raise RewriterError(f"cannot build calibration input '{n}'")
    return inputs, desc


def _packed_ids(tokenizer, texts: list[str], rng: random.Random, samples: int, seq_len: int) -> torch.Tensor:
    """(samples, seq_len) ids: passages in a seeded order (cycled when the texts run short), separated by EOS."""
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    need = samples * seq_len
    stream: list[int] = []
    while len(stream) < need:
        before = len(stream)
        for i in rng.sample(range(len(texts)), k=len(texts)):
            stream += tokenizer(texts[i], add_special_tokens=False, verbose=False)["input_ids"] + sep
            if len(stream) >= need:
                break
        if len(stream) == before:
            raise RewriterError("the calibration texts hold no tokens", "pass a text file with some text in it")
    return torch.tensor(stream[:need], dtype=torch.long).view(samples, seq_len)


def _decoder(cfg: dict) -> bool:
    archs = cfg.get("architectures") or []
    return bool(cfg.get("is_decoder")) or any("CausalLM" in a or "LMHead" in a for a in archs) or \
        cfg.get("model_type") in ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt_neox", "opt")


def _tokenizer(program: Program):
    folder = program.meta.get("hf_folder")
    if not folder:
        return None
    from .load import TOKENIZER_FILES
    if not any((Path(folder) / f).exists() for f in TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(folder)
    except Exception:
        return None


def compare_outputs(reference: tuple[torch.Tensor, ...], candidate: tuple[torch.Tensor, ...], names: list[str],
                    inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Error of the primary (first) output over real tokens, plus a mean-pooled embedding cosine for encoders."""
    ref, cand = reference[0].double(), candidate[0].double()
    mask = inputs.get("attention_mask")
    if mask is not None and ref.dim() >= 2 and ref.shape[:2] == mask.shape:
        keep = mask.bool()
        r, c = ref[keep], cand[keep]
    else:
        r, c = ref.reshape(-1, ref.shape[-1]), cand.reshape(-1, cand.shape[-1])
    diff = (r - c)
    metrics: dict[str, Any] = {
        "output": names[0],
        "max_abs_error": float(diff.abs().max()) if diff.numel() else 0.0,
        "relative_error": float(diff.norm() / r.norm().clamp_min(1e-30)),
        "cosine": float(torch.nn.functional.cosine_similarity(r, c, dim=-1).mean()),
    }
    if not torch.isfinite(c).all():
        metrics["non_finite"] = True
    if mask is not None and ref.dim() == 3 and ref.shape[:2] == mask.shape and names[0] == "last_hidden_state":
        m = mask[..., None].double()
        er = torch.nn.functional.normalize((ref * m).sum(1) / m.sum(1), dim=-1)
        ec = torch.nn.functional.normalize((cand * m).sum(1) / m.sum(1), dim=-1)
        cos = (er * ec).sum(-1)
        metrics["embedding_cosine"] = float(cos.mean())
        metrics["embedding_cosine_min"] = float(cos.min())
    return metrics
