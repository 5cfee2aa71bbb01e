"""Data for the trained decoder, made on CPU: the by-file split of the stdlib's .py sources, the BPE tokenizer
(HF `tokenizers`, byte-level, digits split one by one, 8192 tokens, trained on the training files only), and the
packed token streams (uint16, each file followed by <|endoftext|>) that benchmarks/train_decoder.py reads.

    python benchmarks/decoder_data.py     # writes benchmarks/decoder_split.json, rewriter/data/decoder/tokenizer*.json,
                                          # .gpu_decoder/{train,heldout}.bin and .gpu_decoder/meta.json (ignored)
"""
from __future__ import annotations

import json
import os

import numpy as np

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from decoder_common import (DATA_DIR, DECODER_DIR, EOS, SEQ_LEN, SPLIT_JSON, VOCAB_SIZE, Templates, is_held_out,
                            list_stdlib_files, python_version, read_text, stdlib_dir)


def train_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def main():
    files = list_stdlib_files()
    train = [f for f in files if not is_held_out(f)]
    held = [f for f in files if is_held_out(f)]
    print(f"python {python_version()} stdlib {stdlib_dir()}: {len(files)} files, {len(train)} train, {len(held)} held out")
    tok = train_tokenizer(read_text(f) for f in train)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=None,
                                 model_max_length=SEQ_LEN)
    DECODER_DIR.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(DECODER_DIR)
    templates = Templates.from_tokenizer(tok)
    eos = templates.eos

    DATA_DIR.mkdir(exist_ok=True)
    counts = {}
    for name, split in (("train", train), ("heldout", held)):
        stream = []
        for f in split:
            stream.extend(tok.encode(read_text(f)).ids)
            stream.append(eos)
        arr = np.asarray(stream, dtype=np.uint16)
        arr.tofile(DATA_DIR / f"{name}.bin")
        counts[name] = int(arr.size)
        print(name, arr.size, "tokens")
    meta = dict(python=python_version(), vocab_size=VOCAB_SIZE, seq_len=SEQ_LEN, tokens=counts,
                templates=templates.to_json())
    (DATA_DIR / "meta.json").write_text(json.dumps(meta, indent=1))
    SPLIT_JSON.write_text(json.dumps(dict(
        note="Split by file of the CPython stdlib .py sources (paths relative to the stdlib folder); held out when "
             "sha1(path)[0] < 13. Made by benchmarks/decoder_data.py.",
        python=python_version(), tokens=counts, templates=templates.to_json(), train=train, held_out=held),
        indent=0) + "\n")


if __name__ == "__main__":
    main()
