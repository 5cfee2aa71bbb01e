"""Shared pieces of the trained-decoder pipeline (benchmarks/decoder_data.py, train_decoder.py, decoder_eval.py).

The corpus is the running Python's standard library (every .py file under the stdlib folder, site-packages excluded;
pydoc_data/topics.py is one of them), split by file: a file is held out when the first byte of sha1(relative path)
is below 13 (about 5%). The split, the tokenizer and the packed token files are made once, here on CPU, by
decoder_data.py; the split is recorded in benchmarks/decoder_split.json so that evaluation reads the same files.

The synthetic retrieval task (a passkey) is built at token level, so that the needle and the query hold exactly the
same token ids wherever they are spliced into the filler text:

    ...filler...  "\\n# passkey = " d d d d d "\\n"  ...filler (gap)...  "\\n# recall passkey = " d d d d d "\\n"

The tokenizer splits digits one by one, so a passkey is always 5 tokens. The distance is the number of tokens from
the needle's first digit to the answer's first digit. A sequence of length S ends with the answer and its newline,
so the filler before the needle is as long as the distance allows: every task sequence is S tokens long.
"""
from __future__ import annotations

import hashlib
import sys
import sysconfig
from pathlib import Path

import torch

EOS = "<|endoftext|>"
VOCAB_SIZE = 8192
SEQ_LEN = 2048
NEEDLE_PREFIX = "\n# passkey = "
QUERY_PREFIX = "\n# recall passkey = "
NEWLINE = "\n"
N_DIGITS = 5
EVAL_DISTANCES = (64, 256, 512, 1024, 1536, 1900)

REPO = Path(__file__).resolve().parent.parent
SPLIT_JSON = REPO / "benchmarks" / "decoder_split.json"
DECODER_DIR = REPO / "rewriter" / "data" / "decoder"
DATA_DIR = REPO / ".gpu_decoder"        # ignored (/.gpu*/): packed tokens, carried to the device


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_stdlib_files() -> list[str]:
    """Relative paths of the stdlib's .py files, sorted; site-packages and unreadable/non-UTF-8 files excluded."""
    root = stdlib_dir()
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith("site-packages/") or "/site-packages/" in rel:
            continue
        try:
            p.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        out.append(rel)
    return out


def is_held_out(rel: str) -> bool:
    return hashlib.sha1(rel.encode()).digest()[0] < 13


def read_text(rel: str) -> str:
    return (stdlib_dir() / rel).read_bytes().decode("utf-8")


def python_version() -> str:
    return "%d.%d.%d" % sys.version_info[:3]


class Templates:
    """Token ids of the task's fixed pieces and of the ten digits (from the tokenizer, recorded in the meta JSON)."""

    def __init__(self, needle_prefix, query_prefix, newline, digits, eos):
        self.needle_prefix = list(needle_prefix)
        self.query_prefix = list(query_prefix)
        self.newline = list(newline)
        self.digits = list(digits)
        self.eos = int(eos)

    @classmethod
    def from_tokenizer(cls, tok) -> "Templates":
        """tok: a tokenizers.Tokenizer or a transformers fast tokenizer."""
        enc = (lambda s: tok.encode(s).ids) if hasattr(tok, "get_vocab_size") else \
            (lambda s: tok.encode(s, add_special_tokens=False))
        digits = []
        for d in "0123456789":
            ids = enc(d)
            assert len(ids) == 1, (d, ids)
            digits.append(ids[0])
        eos = tok.token_to_id(EOS) if hasattr(tok, "token_to_id") else tok.convert_tokens_to_ids(EOS)
        t = cls(enc(NEEDLE_PREFIX), enc(QUERY_PREFIX), enc(NEWLINE), digits, eos)
        # digits must tokenize one by one inside the templates too
        probe = enc(NEEDLE_PREFIX + "01234" + NEWLINE)
        assert probe == t.needle_prefix + digits[:5] + t.newline, probe
        return t

    def to_json(self) -> dict:
        return dict(needle_prefix=self.needle_prefix, query_prefix=self.query_prefix, newline=self.newline,
                    digits=self.digits, eos=self.eos)

    @classmethod
    def from_json(cls, d: dict) -> "Templates":
        return cls(d["needle_prefix"], d["query_prefix"], d["newline"], d["digits"], d["eos"])

    def min_distance(self) -> int:
        return N_DIGITS + len(self.newline) + len(self.query_prefix)

    def max_distance(self, seq_len: int) -> int:
        return seq_len - len(self.newline) - N_DIGITS - len(self.needle_prefix)


def retrieval_sequence(filler: torch.Tensor, distance: int, key: torch.Tensor, t: Templates, seq_len: int):
    """One task sequence of seq_len tokens. filler: 1-D long tensor of >= seq_len tokens of real text; key: 5 digit
    indices (0-9). Returns (ids, answer_start): ids[answer_start:answer_start+5] are the answer's digit tokens."""
    assert t.min_distance() <= distance <= t.max_distance(seq_len), distance
    dev = filler.device
    lt = lambda xs: torch.tensor(xs, dtype=torch.long, device=dev)
    digits = lt(t.digits)[key.to(dev)]
    answer_start = seq_len - len(t.newline) - N_DIGITS
    needle_digits = answer_start - distance
    a_len = needle_digits - len(t.needle_prefix)
    gap = answer_start - len(t.query_prefix) - (needle_digits + N_DIGITS + len(t.newline))
    ids = torch.cat([filler[:a_len], lt(t.needle_prefix), digits, lt(t.newline), filler[a_len:a_len + gap],
                     lt(t.query_prefix), digits, lt(t.newline)])
    assert ids.numel() == seq_len, ids.numel()
    return ids, answer_start
