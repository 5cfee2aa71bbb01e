"""Quality measures for causal language models: perplexity with a sliding window over long token streams, and
retrieval (passkey) accuracy by distance.

Both take either an HF causal LM (anything whose call with ``input_ids=`` returns an object with ``.logits``) or a
plain callable mapping a (B, T) LongTensor of token ids to (B, T, V) logits, so a captured or rewritten program can
be measured the same way as the model it came from.

    from rewriter.evaluate import perplexity, PasskeyTask, retrieval_accuracy_by_distance
    perplexity(model, ids, window=2048, stride=1024)
    task = PasskeyTask.from_tokenizer(tok, filler_ids, seq_len=2048)
    retrieval_accuracy_by_distance(model, task, [64, 512, 1900], trials=20)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def as_logits_fn(model) -> LogitsFn:
    """A callable ids -> logits for an HF causal LM or a callable that already returns logits (or an output with
    .logits)."""
    def fn(ids: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids) if isinstance(model, torch.nn.Module) else model(ids)
        return out.logits if hasattr(out, "logits") else out
    return fn


def _streams(ids) -> list[torch.Tensor]:
    if isinstance(ids, torch.Tensor):
        return [ids.reshape(-1).long()] if ids.dim() <= 1 or ids.shape[0] == 1 else [r.long() for r in ids]
    ids = list(ids)
    if ids and isinstance(ids[0], int):
        return [torch.tensor(ids, dtype=torch.long)]
    return [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in ids]


@torch.no_grad()
def perplexity(model, ids, window: int = 2048, stride: int | None = None, device=None) -> dict:
    """Perplexity of token stream(s) ``ids`` (a 1-D tensor or list of ints, or a list of them, e.g. one per file;
    a 2-D tensor is one stream per row) with a sliding window.

    Each stream is read in windows of at most ``window`` tokens whose ends advance by ``stride`` (default: window,
    non-overlapping); the last window is pulled back to be ``window`` tokens long where the stream allows. A window
    scores the tokens after the previous window's end that have a token before them in the window, with all the
    window's earlier tokens as context. So with stride < window every token after a stream's first is scored exactly
    once, with at least window - stride tokens of context; with stride == window (the usual chunked evaluation) the
    first token of each later window has no context and is not scored. Returns dict(nll=mean NLL in nats,
    perplexity=exp(nll), tokens=count scored)."""
    stride = stride or window
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in (0, window], got {stride} for window {window}")
    fn = as_logits_fn(model)
    total, count = 0.0, 0
    for s in _streams(ids):
        n = s.numel()
        prev_end, end = 0, min(window, n)
        while prev_end < n:
            begin = max(0, end - window)
            x = s[begin:end][None]
            if device is not None:
                x = x.to(device)
            logits = fn(x)[0].float()
            first = max(prev_end, begin + 1)          # first target position scored in this window
            tgt = s[first:end].to(logits.device)
            lp = torch.log_softmax(logits[first - begin - 1:end - begin - 1], dim=-1)
            total -= lp.gather(-1, tgt[:, None]).sum().item()
            count += tgt.numel()
            prev_end, end = end, min(end + stride, n)
    if count == 0:
        raise ValueError("nothing to score: every stream is shorter than 2 tokens")
    nll = total / count
    return dict(nll=nll, perplexity=math.exp(nll), tokens=count)


@dataclass
class PasskeyTask:
    """Passkey retrieval at token level: filler text, then ``needle_prefix + key + newline`` at the chosen distance
    before the end, more filler, then ``query_prefix`` followed by the key as the answer and a newline, ending the
    sequence of ``seq_len`` tokens. ``digits`` are the ten digits' token ids (a key is ``n_digits`` of them, so the
    tokenizer must split digits one by one); the distance is from the needle's first key token to the answer's first.
    ``filler`` is one long 1-D stream of real text (windows are drawn at random offsets)."""
    filler: torch.Tensor
    needle_prefix: Sequence[int]
    query_prefix: Sequence[int]
    newline: Sequence[int]
    digits: Sequence[int]
    seq_len: int = 2048
    n_digits: int = 5

    @classmethod
    def from_tokenizer(cls, tok, filler, seq_len: int = 2048, n_digits: int = 5,
                       needle="\n# passkey = ", query="\n# recall passkey = ", newline="\n") -> "PasskeyTask":
        enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
        digits = [enc(str(d)) for d in range(10)]
        if any(len(d) != 1 for d in digits):
            raise ValueError("the tokenizer does not give one token per digit")
        return cls(torch.as_tensor(filler, dtype=torch.long).reshape(-1), enc(needle), enc(query), enc(newline),
                   [d[0] for d in digits], seq_len, n_digits)

    def distance_range(self) -> tuple[int, int]:
        lo = self.n_digits + len(self.newline) + len(self.query_prefix)
        hi = self.seq_len - len(self.newline) - self.n_digits - len(self.needle_prefix)
        return lo, hi

    def build(self, distance: int, key: torch.Tensor, offset: int) -> tuple[torch.Tensor, int]:
        """(ids of seq_len tokens, answer_start)."""
        lo, hi = self.distance_range()
        if not lo <= distance <= hi:
            raise ValueError(f"distance {distance} outside [{lo}, {hi}] for seq_len {self.seq_len}")
        t = lambda xs: torch.as_tensor(list(xs), dtype=torch.long)
        filler = self.filler[offset:offset + self.seq_len]
        key_ids = t(self.digits)[key]
        answer = self.seq_len - len(self.newline) - self.n_digits
        needle_at = answer - distance
        a_len = needle_at - len(self.needle_prefix)
        gap = answer - len(self.query_prefix) - (needle_at + self.n_digits + len(self.newline))
        ids = torch.cat([filler[:a_len], t(self.needle_prefix), key_ids, t(self.newline), filler[a_len:a_len + gap],
                         t(self.query_prefix), key_ids, t(self.newline)])
        assert ids.numel() == self.seq_len
        return ids, answer

    def sample(self, distance: int, generator: torch.Generator) -> tuple[torch.Tensor, int, int]:
        if self.filler.numel() < self.seq_len:
            raise ValueError("filler shorter than seq_len")
        offset = int(torch.randint(0, self.filler.numel() - self.seq_len + 1, (1,), generator=generator))
        key = torch.randint(0, 10, (self.n_digits,), generator=generator)
        ids, answer = self.build(distance, key, offset)
        return ids, answer, self.n_digits


@torch.no_grad()
def retrieval_accuracy_by_distance(model, task, distances: Iterable[int], trials: int = 20, seed: int = 1234,
                                   batch_size: int = 1, device=None) -> dict[int, float]:
    """Share of trials per distance whose answer greedy decoding gets entirely right.

    ``task`` is a PasskeyTask or any object with ``sample(distance, generator) -> (ids, answer_start, answer_len)``
    (all trials of one distance must share answer_start and answer_len). A trial counts when the argmax at every
    answer position, given the true tokens before it, is the answer token: that is exactly when greedy decoding
    from ids[:answer_start] produces the answer. Trials are drawn from one seeded generator, in distance order."""
    fn = as_logits_fn(model)
    g = torch.Generator()
    g.manual_seed(seed)
    out = {}
    for d in distances:
        samples = [task.sample(d, g) for _ in range(trials)]
        starts = {(a, n) for _, a, n in samples}
        if len(starts) != 1:
            raise ValueError("trials of one distance must share answer_start and answer_len")
        (a0, n), = starts
        ok = 0
        for i in range(0, trials, batch_size):
            x = torch.stack([s[0] for s in samples[i:i + batch_size]])
            x = x.to(device) if device is not None else x
            logits = fn(x[:, :a0 + n - 1])
            pred = logits[:, -n:].argmax(-1)
            ok += (pred == x[:, a0:a0 + n]).all(-1).sum().item()
        out[int(d)] = ok / trials
    return out


# --- `rewriter eval`: a model folder (HF or rewriter output) against its baseline -----------------------------------

TASKS = ("perplexity", "retrieval", "embedding")
MAX_EVAL_LENGTH = 1 << 20


@dataclass
class Subject:
    """One model under evaluation: ids (B, T) -> logits (lm) or last hidden states (encoder)."""
    source: str
    kind: str                          # "lm" | "encoder"
    fn: Callable[[torch.Tensor], torch.Tensor]
    max_len: int
    folder: Path | None                # where its tokenizer files are, if any
    origin: str | None = None          # a rewriter output's source folder (its default baseline)


def _max_positions(config) -> int | None:
    get = (lambda k: config.get(k)) if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    for k in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
        if isinstance(get(k), int):
            return get(k)
    return None


def open_subject(src: str | Path) -> Subject:
    """An HF folder or a rewriter output folder -> Subject (RewriterError for anything else)."""
    from .errors import RewriterError
    from .load import TOKENIZER_FILES, is_rewriter_output, load
    path = Path(src)
    if is_rewriter_output(path):
        import json
        from .backends.torch_backend import META_FILE, load_program
        program = load_program(path)
        names = program.output_names
        out = "logits" if "logits" in names else "last_hidden_state" if "last_hidden_state" in names else None
        if out is None:
            raise RewriterError(f"{path}'s program outputs {', '.join(names)}; eval needs logits (causal LM) or "
                                "last_hidden_state (encoder)")
        index = names.index(out)
        extra = [n for n in program.input_names if n not in ("input_ids", "attention_mask", "token_type_ids")]
        if "input_ids" not in program.input_names or extra:
            raise RewriterError(f"{path}'s program takes {', '.join(program.input_names)}; eval feeds token ids only")

        def fn(ids):
            feed = {"input_ids": ids.to(program.device())}
            if "attention_mask" in program.input_names:
                feed["attention_mask"] = torch.ones_like(feed["input_ids"])
            if "token_type_ids" in program.input_names:
                feed["token_type_ids"] = torch.zeros_like(feed["input_ids"])
            return program.run(**feed)[index]
        hi = program.dim_bounds.get("seq", (2, _max_positions(program.config) or 512))[1]
        origin = json.loads((path / META_FILE).read_text()).get("source")
        has_tok = any((path / f).exists() for f in TOKENIZER_FILES)
        return Subject(str(path), "lm" if out == "logits" else "encoder", fn, int(hi), path if has_tok else None,
                       origin if origin and Path(origin).is_dir() else None)
    loaded = load(path)
    module, config = loaded.module, loaded.config
    archs = getattr(config, "architectures", None) or []
    lm = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)

    @torch.no_grad()
    def fn(ids):
        ids = ids.to(next(module.parameters()).device)
        out = module(input_ids=ids, attention_mask=torch.ones_like(ids))
        return out.logits if lm else out.last_hidden_state
    folder = loaded.folder if loaded.folder is not None and any((loaded.folder / f).exists()
                                                                for f in TOKENIZER_FILES) else None
    return Subject(str(path), "lm" if lm else "encoder", fn, _max_positions(config) or 512, folder)


def heldout_texts() -> tuple[list[str], str]:
    """The shipped decoder's held-out stdlib files (rewriter/data/decoder/heldout_files.json), read from the running
    Python's stdlib; the files it lacks are left out (and the description says how many)."""
    import json
    import sysconfig
    from .data import DECODER_DIR
    info = json.loads((DECODER_DIR / "heldout_files.json").read_text())
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, missing = [], 0
    for rel in info["files"]:
        try:
            texts.append((root / rel).read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError):
            missing += 1
    desc = f"the shipped decoder's {len(texts)} held-out stdlib files (Python {info['python']}'s split)"
    if missing:
        desc += f"; {missing} not in this Python's stdlib"
    return texts, desc


def read_eval_text(path: str | Path) -> list[str]:
    """A UTF-8 text file (or a folder: its files, sorted) -> one text per file."""
    from .errors import RewriterError
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    if not p.exists():
        raise RewriterError(f"--text: no such file or folder: {p}")
    texts = []
    for f in files:
        try:
            texts.append(f.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            raise RewriterError(f"--text: {f} is not UTF-8 text") from None
        except OSError as e:
            raise RewriterError(f"--text: cannot read {f}: {e.strerror}") from None
    if not any(t.strip() for t in texts):
        raise RewriterError(f"--text: {p} holds no text")
    return texts


def _tokenizer(subjects: list[Subject]):
    from .errors import RewriterError
    folder = next((s.folder for s in subjects if s.folder is not None), None)
    if folder is None:
        raise RewriterError(f"no tokenizer in {' or '.join(s.source for s in subjects)}",
                            "add the tokenizer files to the model folder")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder))


def _check_lengths(lengths, lo: int, hi: int, what: str) -> list[int]:
    from .errors import RewriterError
    for n in lengths:
        if isinstance(n, bool) or not isinstance(n, int) or not lo <= n <= hi:
            raise RewriterError(f"--lengths: {what} {n!r} is outside [{lo}, {hi}]")
    return sorted(set(lengths))


def run_eval(src: str | Path, baseline: str | Path | None = None, *, task: str = "perplexity",
             texts: list[str] | None = None, text_desc: str | None = None, lengths: list[int] | None = None,
             trials: int = 10, max_tokens: int | None = None, seed: int = 1234,
             progress: Callable[[str], None] = lambda m: None) -> dict:
    """Measure SRC (and BASELINE beside it) on one task; see api.evaluate."""
    from .errors import RewriterError
    if task not in TASKS:
        raise RewriterError(f"unknown task {task!r}", f"use one of {', '.join(TASKS)}")
    if isinstance(trials, bool) or not isinstance(trials, int) or not 1 <= trials <= 10_000:
        raise RewriterError(f"--trials must be an integer in [1, 10000]; got {trials!r}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2):
        raise RewriterError(f"--max-tokens must be an integer >= 2; got {max_tokens!r}")
    progress(f"loading {src}")
    subjects = [open_subject(src)]
    if baseline is None and subjects[0].origin is not None:
        baseline = subjects[0].origin
    if baseline is not None:
        progress(f"loading {baseline}")
        subjects.append(open_subject(baseline))
    want = "encoder" if task == "embedding" else "lm"
    for s in subjects:
        if s.kind != want:
            raise RewriterError(f"{s.source} is {'a causal LM' if s.kind == 'lm' else 'an encoder (no LM head)'}; "
                                f"task {task} needs {'an encoder' if want == 'encoder' else 'a causal LM'}")
    if task == "embedding" and len(subjects) < 2:
        raise RewriterError("the embedding task compares two models", "pass --baseline (the original folder)")
    max_len = min(s.max_len for s in subjects)
    tok = _tokenizer(subjects)
    if texts is None:
        if task == "embedding":
            from .calibration import default_texts
            texts, text_desc = default_texts(), "pydoc topic pages"
        else:
            texts, text_desc = heldout_texts()
    streams = [tok(t, add_special_tokens=False, verbose=False)["input_ids"] for t in texts]
    res = dict(task=task, src=subjects[0].source, baseline=subjects[1].source if len(subjects) > 1 else None,
               text=text_desc or "", rows=[])
    names = ["src", "baseline"][:len(subjects)]
    if task == "perplexity":
        lengths = _check_lengths(lengths or [min(max_len, 2048)], 2, max_len, "window")
        kept, total = [], 0
        for s in streams:
            if max_tokens is not None and total >= max_tokens:
                break
            s = s[:max_tokens - total] if max_tokens is not None else s
            if len(s) >= 2:
                kept.append(s)
                total += len(s)
        if not kept:
            raise RewriterError("the text has fewer than 2 tokens per file: nothing to score")
        res.update(tokens=total, stride="window // 2: every token after a file's first is scored once, with at "
                                        "least window // 2 tokens of context where the file allows")
        for n in lengths:
            row = {"length": n}
            for name, s in zip(names, subjects):
                progress(f"perplexity of {name} with {n}-token windows")
                row[name] = perplexity(s.fn, kept, window=n, stride=max(1, n // 2))
            res["rows"].append(row)
    elif task == "retrieval":
        filler = [t for s in streams for t in s][:max_tokens]
        seq_len = min(max_len, 2048)
        try:
            ptask = PasskeyTask.from_tokenizer(tok, filler, seq_len=seq_len)
        except ValueError as e:
            raise RewriterError(f"retrieval: {e}") from None
        if len(filler) < seq_len:
            raise RewriterError(f"retrieval needs at least {seq_len} tokens of filler text; the text has "
                                f"{len(filler)}")
        lo, hi = ptask.distance_range()
        lengths = _check_lengths(lengths or sorted({max(lo, seq_len // 8), seq_len // 4, seq_len // 2, hi}), lo, hi,
                                 "distance")
        res.update(seq_len=seq_len, trials=trials, seed=seed)
        for name, s in zip(names, subjects):
            progress(f"passkey retrieval of {name}")
            acc = retrieval_accuracy_by_distance(s.fn, ptask, lengths, trials=trials, seed=seed)
            for i, n in enumerate(lengths):
                if name == "src":
                    res["rows"].append({"length": n})
                res["rows"][i][name] = {"accuracy": acc[n]}
    else:
        lengths = _check_lengths(lengths or [min(128, max_len)], 2, max_len, "length")
        batch = [s for s in streams if s]
        for n in lengths:
            progress(f"embeddings at {n} tokens")
            cos = []
            for s in batch:
                ids = torch.tensor([s[:n]])
                a, b = (x.fn(ids).double().mean(dim=1)[0] for x in subjects)
                cos.append(torch.nn.functional.cosine_similarity(a, b, dim=0).item())
            res["rows"].append({"length": n, "texts": len(cos), "cosine_mean": sum(cos) / len(cos),
                                "cosine_min": min(cos)})
    return res


def plot_eval(res: dict, path: Path) -> str | None:
    """Accuracy / perplexity / cosine vs length, src and baseline as two lines. None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    x = [r["length"] for r in res["rows"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if res["task"] == "embedding":
        ax.plot(x, [r["cosine_mean"] for r in res["rows"]], "o-", label="mean cosine src vs baseline")
        ax.set_ylabel("cosine")
    else:
        key = "perplexity" if res["task"] == "perplexity" else "accuracy"
        for name in ("src", "baseline"):
            if res["rows"] and name in res["rows"][0]:
                ax.plot(x, [r[name][key] for r in res["rows"]], "o-", label=f"{name}: {res[name]}")
        ax.set_ylabel(key)
    ax.set_xlabel("window (tokens)" if res["task"] == "perplexity" else
                  "passkey distance (tokens)" if res["task"] == "retrieval" else "tokens")
    ax.set_title(f"rewriter eval: {res['task']}")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
