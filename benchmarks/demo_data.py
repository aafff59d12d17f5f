"""Shared setup of the demo-model benchmark scripts: the model, its tokenizer, calibration windows and held-out
tokens from the deterministic CPython-stdlib splits (``moeq.calib.stdlib``)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeq.assets import demo_model_path
from moeq.calib.data import random_windows
from moeq.calib.stdlib import stdlib_text


def demo_setup(nsamples: int, seqlen: int, train_bytes: int = 400_000, heldout_bytes: int = 200_000):
    """``(model fp32 eval, tokenizer, calib [nsamples, seqlen] int64, held-out ids [N] int64)``."""
    torch.manual_seed(0)
    path = demo_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    fp = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    calib = random_windows(torch.tensor(tok(stdlib_text("train", max_bytes=train_bytes))["input_ids"]), nsamples,
                           seqlen, seed=0)
    held = torch.tensor(tok(stdlib_text("heldout", max_bytes=heldout_bytes))["input_ids"])
    return fp, tok, calib, held


def evaluate(model, held: torch.Tensor, seqlen: int, fp_routes: dict | None) -> dict:
    """One pass over the held-out windows of ``seqlen``: per-window mean token NLL (float64; ``exp(mean)`` of
    these is the GPTQ-convention perplexity of ``moeq eval``) and every router's top-k ids (hooks), compared with
    the FP model's routes (``None``: this is the FP model; its routes are returned under ``"routes"``)."""
    import math

    import torch.nn.functional as F

    from moeq.eval.perplexity import windows
    from moeq.eval.routing import RouterTap, agreement_from_routes

    nll, per_layer = [], {}
    with RouterTap(model) as tap:
        for w in windows(held, seqlen):
            logits = model(w[None], use_cache=False).logits.float()[0]
            nll.append(float(F.cross_entropy(logits[:-1], w[1:])))
            for layer in tap.layers:
                per_layer.setdefault(layer, []).append(tap.indices[layer].cpu())
    routes = {"layers": tap.layers, "k": tap.top_k, "E": tap.num_experts,
              "routes": {layer: torch.cat(v) for layer, v in per_layer.items()}}
    nll = torch.tensor(nll, dtype=torch.float64)
    out = {"ppl": math.exp(float(nll.mean())), "window_nll": nll.tolist()}
    if fp_routes is None:
        return {**out, "routes": routes, "topk_overlap": 1.0, "exact_match": 1.0}
    agree = agreement_from_routes(routes, fp_routes)
    return {**out, "topk_overlap": agree["topk_overlap"], "exact_match": agree["exact_match"],
            "routing_layers": agree["layers"]}


def write_results(out: str, res: dict, markdown) -> None:
    """``<out>.json`` (the measured record) and ``<out>.md`` (``markdown(res)``), also printed."""
    import json
    from pathlib import Path

    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    p.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
