"""Train the small Llama decoder that ships in rewriter/data/decoder (one H200 call of under 10 minutes).

Data: the packed token streams made on CPU by benchmarks/decoder_data.py (.gpu_decoder/, carried to the device).
Each step draws `batch` windows of `seq` tokens at random offsets of the training stream; a `retrieval_frac` share of
them become passkey sequences (benchmarks/decoder_common.py), with distances over [min, max_distance] (density
growing linearly with the distance by default). The loss is the next-token loss over every position of the text
windows and, by default, over the 5 answer digits only of the passkey sequences (--task-loss). bf16 autocast over fp32
weights, fused AdamW, linear warm-up then cosine decay to 10%. Unless --steps is given, the step count is fixed after
the first steps from the measured step time so that training ends within --budget seconds.

Every `eval_every` steps: held-out loss on 32 fixed held-out windows and passkey accuracy at the longest distance;
the weights with the lowest held-out loss so far are kept. At the end, full held-out perplexity and accuracy by
distance, for the final and the kept weights. Writes under --out: final/ and best/ (config.json +
model.safetensors, bf16, embed_tokens only since lm_head is tied), log.jsonl, summary.json.

    # on the H200 (see README "The trained decoder"):
    python benchmarks/train_decoder.py --out $OUT --budget 330
    # CPU dry run:
    python benchmarks/train_decoder.py --device cpu --out /tmp/dec --hidden 64 --layers 2 --inter 128 --seq 256 \
        --batch 4 --steps 4 --eval-every 2 --eval-trials 4
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from decoder_common import DATA_DIR, EVAL_DISTANCES, N_DIGITS, Templates, retrieval_sequence

T0 = time.time()


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(DATA_DIR))
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--inter", type=int, default=640)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--retrieval-frac", type=float, default=0.75)
    p.add_argument("--max-distance", type=int, default=1900)
    p.add_argument("--task-loss", choices=("all", "answer"), default="answer",
                   help="passkey sequences: loss on every token, or on the 5 answer digits only (their filler then "
                        "adds no language-model gradient, so the task share can grow without more passes over the "
                        "small corpus)")
    p.add_argument("--distance-skew", choices=("uniform", "sqrt"), default="sqrt",
                   help="sqrt: density of distances grows linearly with the distance (long ones are the hard ones)")
    p.add_argument("--budget", type=float, default=400.0, help="seconds of training (from process start)")
    p.add_argument("--steps", type=int, default=0, help="fixed step count (0: from the budget)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-trials", type=int, default=200)
    p.add_argument("--log-every", type=int, default=10)
    return p.parse_args()


def make_model(a, vocab, device):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=a.hidden, intermediate_size=a.inter, num_hidden_layers=a.layers,
                      num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, head_dim=a.hidden // a.heads,
                      max_position_embeddings=a.seq, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      bos_token_id=0, eos_token_id=0, pad_token_id=None, attention_bias=False, mlp_bias=False,
                      architectures=["LlamaForCausalLM"], attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(device)
    return cfg, model


class Batches:
    def __init__(self, train, templates, a, device):
        self.train, self.t, self.a, self.device = train, templates, a, device
        self.g = torch.Generator(device=device)
        self.g.manual_seed(a.seed + 1)
        self.gc = torch.Generator()           # task distances and keys on the CPU: no device sync per step
        self.gc.manual_seed(a.seed + 2)
        self.ar = torch.arange(a.seq, device=device)
        self.lo = templates.min_distance()
        self.hi = min(a.max_distance, templates.max_distance(a.seq))

    def windows(self, n):
        off = torch.randint(0, self.train.numel() - self.a.seq, (n,), device=self.device, generator=self.g)
        return self.train[off[:, None] + self.ar].long()

    def __call__(self):
        """(input_ids, labels); labels are -100 where no loss is taken."""
        a = self.a
        x = self.windows(a.batch)
        labels = x.clone()
        n_r = int(round(a.batch * a.retrieval_frac))
        if n_r:
            u = torch.rand(n_r, generator=self.gc)
            if a.distance_skew == "sqrt":
                u = u.sqrt()
            dist = (self.lo + (u * (self.hi - self.lo + 1)).long().clamp(max=self.hi - self.lo)).tolist()
            keys = torch.randint(0, 10, (n_r, N_DIGITS), generator=self.gc)
            for i in range(n_r):
                x[i], a0 = retrieval_sequence(x[i], dist[i], keys[i], self.t, a.seq)
                labels[i] = x[i]
                if a.task_loss == "answer":
                    labels[i, :a0] = -100
                    labels[i, a0 + N_DIGITS:] = -100
        return x, labels


@torch.no_grad()
def held_out_nll(model, held, seq, device, n_windows=None, bs=16):
    """Mean next-token NLL over non-overlapping seq-token windows of the held-out stream (first n_windows)."""
    n = (held.numel() - 1) // seq if n_windows is None else n_windows
    tot, cnt = 0.0, 0
    for s in range(0, n, bs):
        idx = torch.arange(s, min(n, s + bs), device=device)[:, None] * seq + torch.arange(seq, device=device)
        x = held[idx].long()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=x).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                x[:, 1:].reshape(-1), reduction="sum")
        tot += nll.item()
        cnt += x[:, 1:].numel()
    return tot / cnt


@torch.no_grad()
def retrieval_acc(model, held, t, seq, device, distances, trials, seed=1234, bs=16):
    """Passkey accuracy (all 5 digits right under greedy decoding, which equals every teacher-forced argmax right)
    with held-out filler, per distance."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    out = {}
    for d in distances:
        if d > t.max_distance(seq):
            continue
        seqs, starts = [], []
        for _ in range(trials):
            off = int(torch.randint(0, held.numel() - seq, (1,), generator=g))
            key = torch.randint(0, 10, (N_DIGITS,), generator=g)
            ids, a0 = retrieval_sequence(held[off:off + seq].long(), d, key, t, seq)
            seqs.append(ids)
            starts.append(a0)
        ok = 0
        for s in range(0, trials, bs):
            x = torch.stack(seqs[s:s + bs]).to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(input_ids=x).logits
            a0 = starts[0]
            pred = logits[:, a0 - 1:a0 - 1 + N_DIGITS].argmax(-1)
            ok += (pred == x[:, a0:a0 + N_DIGITS]).all(-1).sum().item()
        out[str(d)] = ok / trials
    return out


def save(model, cfg, folder: Path):
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in model.state_dict().items()
          if k != "lm_head.weight"}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg.to_json_file(str(folder / "config.json"))


def main():
    a = parse()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(a.device)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    meta = json.loads((Path(a.data) / "meta.json").read_text())
    t = Templates.from_json(meta["templates"])
    train = torch.from_numpy(np.fromfile(Path(a.data) / "train.bin", dtype=np.uint16).astype(np.int32)).to(device)
    held = torch.from_numpy(np.fromfile(Path(a.data) / "heldout.bin", dtype=np.uint16).astype(np.int32)).to(device)
    cfg, model = make_model(a, meta["vocab_size"], device)
    n_params = sum(p.numel() for p in model.parameters())
    log = open(out / "log.jsonl", "w")

    def emit(rec):
        rec["t"] = round(time.time() - T0, 1)
        print(json.dumps(rec), flush=True)
        log.write(json.dumps(rec) + "\n")
        log.flush()

    emit(dict(event="start", params=n_params, torch=torch.__version__, device=str(device),
              gpu=torch.cuda.get_device_name() if device.type == "cuda" else None, args=vars(a)))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=a.wd), dict(params=no_decay, weight_decay=0.0)],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    batches = Batches(train, t, a, device)
    total = a.steps or 10 ** 9
    best = (float("inf"), None, -1)
    step, t_meas = 0, None
    longest = min(a.max_distance, t.max_distance(a.seq))
    model.train()
    try:
        while step < total:
            if not a.steps and step == 3:
                t_meas = time.time()
            if not a.steps and step == 13:
                per = (time.time() - t_meas) / 10
                # evals cost about one step each of 32 windows plus 64 retrieval sequences; keep 10% slack
                total = 13 + int((a.budget - (time.time() - T0)) * 0.9 / per)
                emit(dict(event="plan", step_s=round(per, 4), total_steps=total,
                          tokens_per_s=round(a.batch * a.seq / per)))
            lr_scale = min(1.0, (step + 1) / a.warmup) if step < a.warmup else \
                0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - a.warmup) / max(1, total - a.warmup))))
            for gp in opt.param_groups:
                gp["lr"] = a.lr * lr_scale
            x, labels = batches()
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(input_ids=x, labels=labels).loss
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % a.log_every == 0 or step == 1:
                emit(dict(step=step, loss=round(loss.item(), 4), lr=a.lr * lr_scale, grad_norm=round(gn.item(), 3)))
            if step % a.eval_every == 0 or step == total:
                model.eval()
                hl = held_out_nll(model, held, a.seq, device, n_windows=min(32, (held.numel() - 1) // a.seq))
                ra = retrieval_acc(model, held, t, a.seq, device, [longest], min(64, a.eval_trials))
                model.train()
                if hl < best[0]:
                    best = (hl, {k: v.detach().clone() for k, v in model.state_dict().items()}, step)
                emit(dict(event="eval", step=step, held_out_loss=round(hl, 4), held_out_ppl=round(math.exp(hl), 3),
                          retrieval_longest=ra))
            if not a.steps and time.time() - T0 > a.budget + 30:
                emit(dict(event="stop_on_time", step=step))
                break
    finally:
        model.eval()
        save(model, cfg, out / "final")
        emit(dict(event="saved", which="final", step=step))
        final_sd = None
        if best[1] is not None and best[2] != step:
            final_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.load_state_dict(best[1])
        save(model, cfg, out / "best")
        emit(dict(event="saved", which="best", step=best[2] if best[1] is not None else step))
    summary = dict(params=n_params, steps=step, tokens_seen=step * a.batch * a.seq, train_tokens=train.numel(),
                   best_step=best[2], args=vars(a))
    for name, sd in (("best", None), ("final", final_sd)):
        if name == "final" and sd is None:      # the kept weights are the final ones
            summary["final"] = summary["best"]
            continue
        if sd is not None:
            model.load_state_dict(sd)
        nll = held_out_nll(model, held, a.seq, device)
        acc = retrieval_acc(model, held, t, a.seq, device, (16, 32) + EVAL_DISTANCES if a.seq >= 2048 else
                            [longest], a.eval_trials)
        summary[name] = dict(held_out_nll=nll, held_out_perplexity=math.exp(nll), retrieval_accuracy_by_distance=acc)
        emit(dict(event="final_eval", which=name, **summary[name]))
    summary["wall_s"] = round(time.time() - T0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
