"""LoLCATs' low-rank correction of an approximated attention site: after a learned method's tensors are fitted (the
attention transfer), rank-r updates B A of the q, k, v and output projections are fitted, with the model and the
fitted tensors frozen, so that the site's output through its output projection matches the exact site's output on
the calibration activations. The output projection's update starts from its closed form (reduced-rank ridge regression
of the site's residual on the approximated heads' outputs); Adam then refines all four from there, keeping the
parameters of the lowest training loss seen. The updates are merged into the projections' weights (W + B A), so the
program keeps its graph and shapes: model.pt2, the HF folder and ONNX hold the corrected weights as they hold any
weight.

Only sites whose q / k / v are head reshapes of single linears (BERT, GPT-2's fused c_attn, ViT) are corrected; the
layout is checked on the recorded activations, and a site where it does not hold (RoPE between the projection and
the attention) is refused by name. A quarter of the samples (at least one, when there are two or more) is held out:
the statistics report the site-output relative error on them with and without the correction."""
from __future__ import annotations

import time

import torch

from ..errors import RewriterError
from ..graph import attention_projections, get_attr_tensor, set_attr_tensor
from ..sites import AttentionSite, LinearSite

# ridge of the closed-form output correction, relative to the mean diagonal of the heads' Gram matrix: 0.1 held out
# better than 1e-3 (which overfits 12 x 128 tokens of MiniLM) and 1.0 (under-fits) on two MiniLM layers
LORA_RIDGE = 0.1


def projection_nodes(node, linears: dict[str, LinearSite]) -> dict | None:
    """The q/k/v/o projections of an exact attention node (graph.attention_projections) or None."""
    return attention_projections(node, {n for n in node.graph.nodes if n.name in linears})


def _linear_input(site: LinearSite, args: tuple) -> torch.Tensor:
    return args[1] if site.transposed else args[0]      # addmm(bias, x, w) | linear(x, w, bias)


def _heads_view(y: torch.Tensor, offset: int, heads: int, dim: int) -> torch.Tensor:
    """(B, L, out) -> (B, heads, L, dim): the channels offset .. offset + heads * dim as heads."""
    B, L = y.shape[:2]
    return y[..., offset: offset + heads * dim].reshape(B, L, heads, dim).transpose(1, 2)


def fit_lora(site: AttentionSite, proj: dict, linears: dict[str, LinearSite], gm, recorded: dict,
             q, k, v, key_mask, reference, method_args: tuple, rank: int, steps: int, lr: float, seed: int = 0,
             progress=lambda msg: None) -> dict:
    """Fit and merge the rank-`rank` corrections of one site (see the module docstring). `recorded`: node name ->
    (args, kwargs) of the projections on the calibration inputs; q, k, v, key_mask: the site's recorded inputs;
    `reference(q, k, v, key_mask, causal, scale, *method_args)`: the method's differentiable body. Returns the fit
    statistics; rank 0 changes nothing."""
    if rank <= 0:
        return {}
    t0 = time.perf_counter()
    B, H, L, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    parts = {"q": (H, D, q), "k": (Hkv, D, k), "v": (Hkv, Dv, v)}
    xs, ws = {}, {}
    for name, (heads, dim, target) in parts.items():
        lin_node, offset = proj[name]
        ls = linears[lin_node.name]
        x = _linear_input(ls, recorded[lin_node.name][0]).detach().float().reshape(B, L, -1)
        w = ls.weight_matrix(gm).detach().float()
        b = get_attr_tensor(gm, ls.bias).detach().float() if ls.bias else torch.zeros(w.shape[0])
        made = _heads_view(x @ w.T + b, offset, heads, dim)
        if made.shape != target.shape or not torch.allclose(made, target.float(), rtol=1e-4, atol=1e-4 * (
                1 + float(target.abs().max()))):
            raise RewriterError(f"lora_rank: {site.module_path}'s {name} is not a head reshape of "
                                f"{ls.module_path}'s output (RoPE or another op between them)",
                                "use lora_rank=0 on this model")
        xs[name], ws[name] = x, (ls, offset, heads * dim)
    o = linears[proj["o"].name]
    x_o = _linear_input(o, recorded[proj["o"].name][0]).detach().float().reshape(B, L, -1)
    w_o = o.weight_matrix(gm).detach().float()
    if x_o.shape[-1] != H * Dv:
        raise RewriterError(f"lora_rank: {site.module_path}'s output projection reads {x_o.shape[-1]} channels, "
                            f"not its {H} x {Dv} head outputs", "use lora_rank=0 on this model")
    want = x_o @ w_o.T                                       # the exact site's output (bias left out: it cancels)
    real = (key_mask.bool() if key_mask is not None and not site.causal else torch.ones(B, L, dtype=torch.bool))
    real = real[..., None].float()
    held = max(1, B // 4) if B >= 2 else 0
    train = slice(0, B - held)
    test = slice(B - held, B) if held else slice(0, B)
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for name, x in {**xs, "o": x_o}.items():
        width = ws[name][2] if name != "o" else w_o.shape[0]
        params[name] = (torch.randn(rank, x.shape[-1], generator=gen).div(x.shape[-1] ** 0.5).requires_grad_(True),
                        torch.zeros(width, rank, requires_grad=True))
    km = key_mask
    q0, k0, v0 = q.detach().float(), k.detach().float(), v.detach().float()

    def heads_out(s: slice, use: bool) -> torch.Tensor:
        qq, kk, vv = q0[s], k0[s], v0[s]
        if use:
            qq = qq + _heads_view(xs["q"][s] @ params["q"][0].T @ params["q"][1].T, 0, H, D)
            kk = kk + _heads_view(xs["k"][s] @ params["k"][0].T @ params["k"][1].T, 0, Hkv, D)
            vv = vv + _heads_view(xs["v"][s] @ params["v"][0].T @ params["v"][1].T, 0, Hkv, Dv)
        att = reference(qq, kk, vv, None if km is None else km[s], site.causal, site.scale, *method_args)
        return att.transpose(1, 2).reshape(att.shape[0], L, H * Dv)

    def error(s: slice, use: bool) -> torch.Tensor:
        flat = heads_out(s, use)
        y = flat @ w_o.T
        if use:
            y = y + flat @ params["o"][0].T @ params["o"][1].T
        return (((y - want[s]) * real[s]).pow(2).sum() / (want[s] * real[s]).pow(2).sum().clamp_min(1e-30))

    with torch.no_grad():
        before = float(error(test, False).sqrt())
        train_before = float(error(train, False).sqrt())
        # the output projection's correction in closed form first (reduced-rank ridge regression of the residual on
        # the approximated heads' outputs), then all four refined together by Adam from there
        x = heads_out(train, False)[real[train][..., 0].bool()].double()
        r = (want[train][real[train][..., 0].bool()] - x.float() @ w_o.T).double()
        gram = x.T @ x
        ols = torch.linalg.solve(gram + LORA_RIDGE * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype),
                                 x.T @ r)                                           # (H * Dv, hidden)
        top = torch.linalg.svd(x @ ols, full_matrices=False).Vh[:rank]              # (r, hidden)
        params["o"] = ((top @ ols.T).float().requires_grad_(True), top.T.contiguous().float().requires_grad_(True))
        best_loss = float(error(train, True))
        best = {n: (a.detach().clone(), b.detach().clone()) for n, (a, b) in params.items()}
    opt = torch.optim.Adam([t for pair in params.values() for t in pair], lr=lr)
    with torch.enable_grad():
        for step in range(steps):
            loss = error(train, True)
            if loss.item() < best_loss:      # the parameters this loss was computed with
                best_loss = loss.item()
                best = {n: (a.detach().clone(), b.detach().clone()) for n, (a, b) in params.items()}
            opt.zero_grad()
            loss.backward()
            opt.step()
            if (step + 1) % max(1, steps // 4) == 0 or step + 1 == steps:
                progress(f"lora step {step + 1}/{steps}, site-output loss {loss.item():.4g}")
    with torch.no_grad():
        params = best
        after = float(error(test, True).sqrt())
        for name, (a, b) in params.items():
            ls, offset, width = ws[name] if name != "o" else (o, 0, w_o.shape[0])
            delta = (b @ a)                                   # (width, in) rows of the (out, in) weight
            w = get_attr_tensor(gm, ls.weight)
            new = w.detach().clone()
            if ls.transposed:                                 # Conv1D: stored (in, out)
                new[:, offset: offset + width] += delta.T.to(w.dtype)
            else:
                new[offset: offset + width] += delta.to(w.dtype)
            set_attr_tensor(gm, ls.weight, new)
    info = {"rank": rank, "steps": steps, "train_site_rel_error_uncorrected": round(train_before, 5),
            "train_site_rel_error": round(best_loss ** 0.5, 5),
            "held_out_site_rel_error_uncorrected": round(before, 5),
            "held_out_site_rel_error": round(after, 5), "train_samples": B - held, "held_out_samples": held,
            "seconds": round(time.perf_counter() - t0, 2)}
    progress(f"lora: held-out site-output error {before:.4f} -> {after:.4f} ({info['seconds']} s)")
    return info
