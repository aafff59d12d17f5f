"""Routing measurements through forward hooks on every MoE block's router.

* :class:`RouterTap` records the top-k expert indices each router returns (``adapter.router(block)`` returns
  ``(logits, weights, indices)`` in every supported family);
* :func:`expert_counts`: tokens per expert per MoE layer over a token stream (expert load);
* :func:`routing_agreement`: per-layer top-k overlap of a (quantized) model with its full-precision reference
  on the same input tokens. Each model routes from its *own* hidden states, so the quantized model's routing
  carries the error accumulated in all layers before the router, which is what matters at inference.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from moeq.eval.perplexity import windows
from moeq.models import adapter_for

logger = logging.getLogger(__name__)


class RouterTap:
    """Context manager: forward hooks on the router of every MoE layer of ``model``.

    After a forward pass ``tap.indices[layer_idx]`` is the router's top-k expert ids, int64 ``[T, k]`` with
    ``T = batch * seq`` (row-major over the batch, as the router flattens it). ``tap.layers`` lists the MoE
    layer indices in order; ``tap.num_experts`` / ``tap.top_k`` come from the router outputs and the config.
    """

    def __init__(self, model: nn.Module):
        self.adapter = adapter_for(model)
        self.blocks = self.adapter.moe_layers(model)
        self.layers = [i for i, _ in self.blocks]
        self.num_experts = int(getattr(model.config, self.adapter.num_experts_key))
        self.top_k = int(model.config.num_experts_per_tok)
        self.indices: dict[int, torch.Tensor] = {}
        self._handles = []

    def _hook(self, layer_idx: int):
        def hook(module, args, output):
            if not (isinstance(output, tuple) and len(output) == 3):
                raise TypeError(f"router of layer {layer_idx} returned {type(output).__name__}; "
                                "expected (logits, weights, indices)")
            self.indices[layer_idx] = output[2].detach().reshape(-1, output[2].shape[-1])
        return hook

    def __enter__(self) -> RouterTap:
        for i, block in self.blocks:
            self._handles.append(self.adapter.router(block).register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def counts(self) -> torch.Tensor:
        """Expert usage of the last forward: int64 ``[T, n_moe_layers, E]`` (1 where a token chose an expert)."""
        rows = [torch.zeros(self.indices[i].shape[0], self.num_experts, dtype=torch.long,
                            device=self.indices[i].device).scatter_(1, self.indices[i], 1) for i in self.layers]
        return torch.stack(rows, dim=1)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def expert_counts(model: nn.Module, ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens routed to each expert of each MoE layer: int64 ``[n_moe_layers, E]``.

    ``ids`` is a 1-D token stream (cut into non-overlapping ``seqlen`` windows, as perplexity does) or a 2-D
    batch ``[n, L]`` used as is, with an optional ``attention_mask [n, L]`` whose zeros are not counted.
    Every counted token adds ``top_k`` to its layer's row.
    """
    batch = torch.stack(windows(ids, seqlen)[:max_windows]) if ids.dim() == 1 else ids
    dev = _device(model)
    total = None
    with RouterTap(model) as tap:
        for j in range(batch.shape[0]):
            model(input_ids=batch[j : j + 1].to(dev), use_cache=False)
            c = tap.counts()  # [L, layers, E]
            if attention_mask is not None and ids.dim() == 2:
                c = c * attention_mask[j].to(c.device).long()[:, None, None]
            c = c.sum(0).cpu()
            total = c if total is None else total + c
    return total


@torch.no_grad()
def collect_routes(model: nn.Module, ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> dict:
    """The top-k expert ids of every token: ``{"layers": [...], "k", "E", "routes": {layer: int64 [N, k]}}``
    over the non-overlapping ``seqlen`` windows of a 1-D token stream (``N`` tokens, window-major)."""
    wins = windows(ids, seqlen)[:max_windows]
    per_layer: dict[int, list[torch.Tensor]] = {}
    with RouterTap(model) as tap:
        for w in wins:
            model(input_ids=w[None].to(_device(model)), use_cache=False)
            for layer in tap.layers:
                per_layer.setdefault(layer, []).append(tap.indices[layer].cpu())
    return {"layers": tap.layers, "k": tap.top_k, "E": tap.num_experts,
            "routes": {layer: torch.cat(v) for layer, v in per_layer.items()}}


def agreement_from_routes(routes: dict, reference: dict) -> dict:
    """Per-layer agreement of two :func:`collect_routes` results over the same tokens (see
    :func:`routing_agreement` for the returned fields)."""
    if routes["layers"] != reference["layers"] or routes["k"] != reference["k"] or routes["E"] != reference["E"]:
        raise ValueError("model and reference differ in MoE layers, expert count or top-k")
    k, E = routes["k"], routes["E"]
    per_layer, tokens = [], 0
    for layer in routes["layers"]:
        a, b = routes["routes"][layer], reference["routes"][layer]
        if a.shape != b.shape:
            raise ValueError(f"layer {layer}: routed {tuple(a.shape)} vs {tuple(b.shape)} tokens")
        sa = torch.zeros(a.shape[0], E, dtype=torch.long).scatter_(1, a, 1)  # expert sets as one-hot rows
        sb = torch.zeros(b.shape[0], E, dtype=torch.long).scatter_(1, b, 1)
        inter = (sa * sb).sum(-1)  # [N] experts chosen by both
        tokens = a.shape[0]
        per_layer.append({"layer": layer, "topk_overlap": float(inter.double().mean()) / k,
                          "exact_match": float((inter == k).double().mean())})
    return {"layers": per_layer, "tokens": tokens,
            "topk_overlap": sum(d["topk_overlap"] for d in per_layer) / len(per_layer),
            "exact_match": sum(d["exact_match"] for d in per_layer) / len(per_layer)}


def routing_agreement(model: nn.Module, reference: nn.Module, ids: torch.Tensor, seqlen: int,
                      max_windows: int | None = None) -> dict:
    """Per-layer agreement of ``model``'s top-k routing with ``reference``'s on the same tokens.

    Args:
        model, reference: two models of the same architecture (e.g. quantized and full precision).
        ids: 1-D int64 token stream, cut into non-overlapping ``seqlen`` windows (first ``max_windows``).
    Returns ``{"layers": [{"layer", "topk_overlap", "exact_match"}], "topk_overlap", "exact_match", "tokens"}``:
    ``topk_overlap`` is the mean over tokens of ``|topk_model ∩ topk_ref| / k`` and ``exact_match`` the fraction
    of tokens whose expert *sets* are equal (order ignored); the top-level values average the layers.
    """
    out = agreement_from_routes(collect_routes(model, ids, seqlen, max_windows),
                                collect_routes(reference, ids, seqlen, max_windows))
    logger.info("routing agreement over %d tokens: top-k overlap %.4f, exact set match %.4f",
                out["tokens"], out["topk_overlap"], out["exact_match"])
    return out


def format_agreement(res: dict) -> list[str]:
    """Report lines of :func:`routing_agreement` (one per layer, then the mean)."""
    lines = [f"layer {d['layer']:>3}: top-k overlap {d['topk_overlap']:.4f}, exact set match {d['exact_match']:.4f}"
             for d in res["layers"]]
    lines.append(f"mean     : top-k overlap {res['topk_overlap']:.4f}, exact set match {res['exact_match']:.4f} "
                 f"({res['tokens']} tokens)")
    return lines
