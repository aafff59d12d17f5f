"""Calibration tokens per routed expert: what GPTQ-family quantization of an expert actually has to work with.

An expert's Hessian is built from the tokens routed to it, so the balance number that matters for
quantization is not a spread statistic but the per-layer minimum / median tokens per expert and how many
experts fall under the few-token threshold (``QuantConfig.min_expert_tokens_frac`` of the layer's tokens, the
experts that get the blended or RTN fallback). The same report is used for EBSS samples
(``calib.summary.json``), for plain-text calibration of the same size (``moeq calibrate --compare-text``) and
in the quantize log (one INFO line per layer from :func:`moeq.runner.run_sequential`).
"""

from __future__ import annotations

import statistics

import torch

from moeq.config import QuantConfig

FEW_TOKEN_FRAC = QuantConfig.min_expert_tokens_frac  # the quantizer's threshold, so both reports agree


def expert_token_stats(counts, total_tokens: int, threshold_frac: float = FEW_TOKEN_FRAC,
                       threshold: float | None = None) -> dict:
    """Tokens-per-expert summary of one MoE layer.

    Args:
        counts: tokens routed to each expert ``[E]`` (list or 1-D tensor; a token routed top-k adds 1 to each
            of its k experts).
        total_tokens: calibration tokens that reached the layer (unmasked), which sets the threshold.
        threshold_frac: few-token threshold as a fraction of ``total_tokens``.
        threshold: the threshold in tokens, when already known (the quantizer's own), instead of the fraction.
    Returns ``{"min", "median", "max", "threshold", "under_threshold", "zero", "experts", "total_tokens"}``
    (``median`` of the E counts, the mean of the two middle ones for even E; ``under_threshold`` counts experts
    with fewer than ``threshold`` tokens, the same rule as the quantizer's fallback).
    """
    c = [int(x) for x in (counts.tolist() if isinstance(counts, torch.Tensor) else counts)]
    if not c:
        raise ValueError("expert_token_stats needs the counts of at least one expert")
    if total_tokens < 0 or threshold_frac < 0:
        raise ValueError(f"total_tokens and threshold_frac must be >= 0, got {total_tokens}, {threshold_frac}")
    thr = threshold_frac * total_tokens if threshold is None else float(threshold)
    return {"min": min(c), "median": float(statistics.median(c)), "max": max(c), "threshold": thr,
            "under_threshold": sum(n < thr for n in c), "zero": sum(n == 0 for n in c), "experts": len(c),
            "total_tokens": int(total_tokens)}


def layer_token_stats(counts: torch.Tensor, total_tokens: int, layers: list[int] | None = None,
                      threshold_frac: float = FEW_TOKEN_FRAC) -> list[dict]:
    """:func:`expert_token_stats` of every MoE layer of ``counts [n_moe_layers, E]`` (e.g. the
    ``expert_counts`` of a calibration set), each with its ``layer`` index (``layers``, default 0..n-1)."""
    if counts.dim() != 2:
        raise ValueError(f"counts must be [n_moe_layers, E], got shape {tuple(counts.shape)}")
    layers = list(range(counts.shape[0])) if layers is None else layers
    if len(layers) != counts.shape[0]:
        raise ValueError(f"{len(layers)} layer indices for {counts.shape[0]} rows of counts")
    return [{"layer": i, **expert_token_stats(row, total_tokens, threshold_frac)} for i, row in zip(layers, counts)]


def format_token_stats(s: dict) -> str:
    """One log line of an :func:`expert_token_stats` dict."""
    return (f"tokens per expert min {s['min']} / median {s['median']:g} / max {s['max']}; "
            f"{s['under_threshold']} of {s['experts']} experts under {s['threshold']:.1f} "
            f"({s['zero']} with none) of {s['total_tokens']} tokens")


def summarize_layers(stats: list[dict]) -> dict:
    """Across layers: the smallest min and median, and the total number of few-token experts."""
    return {"min": min(s["min"] for s in stats), "min_median": min(s["median"] for s in stats),
            "under_threshold": sum(s["under_threshold"] for s in stats), "zero": sum(s["zero"] for s in stats),
            "experts": sum(s["experts"] for s in stats)}


def calibration_report(model, calib) -> dict:
    """Expert balance of a calibration set on ``model``: ``{"cv", "expert_counts", "expert_tokens"}``.

    ``calib`` is token ids ``[n, L]`` int64 or a dict with ``input_ids`` and ``attention_mask`` (masked
    positions are not counted), as :func:`moeq.calib.data.load_calibration` returns; ``expert_tokens`` is
    :func:`layer_token_stats` over the unmasked tokens (used for plain-text calibration of the same size as an
    EBSS set, ``moeq calibrate --compare-text``).
    """
    from moeq.calib.ebss import expert_usage_cv
    from moeq.eval.routing import RouterTap, expert_counts

    ids, mask = (calib["input_ids"], calib.get("attention_mask")) if isinstance(calib, dict) else (calib, None)
    counts = expert_counts(model, ids, ids.shape[1], attention_mask=mask)
    total = int(mask.sum()) if mask is not None else ids.numel()
    layers = RouterTap(model).layers
    return {"cv": float(expert_usage_cv(counts)), "expert_counts": counts.tolist(),
            "expert_tokens": layer_token_stats(counts, total, layers)}
