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
