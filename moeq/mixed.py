"""Mixed precision for routed experts (QuantMoE-Bench / MoQa style): importance scores and bit allocation.

Scores (higher = keep more bits):
- ``outlier``: per expert projection, ``max_c max_n |W[n, c]| / mean |W|``: the largest input column's peak
  against the matrix's mean magnitude (weights only, no data);
- ``frequency``: how often the router picks the expert on calibration tokens; ``affinity``: the routing
  weight mass it receives (MoQa's expert importance), both from one calibration forward;
- ``block``: ``1 - mean_t cos(x_in[t], x_out[t])`` of the decoder layer holding the MoE block (how much the
  layer changes the residual stream), shared by all experts of the layer.

Allocation: units (a whole layer, one expert, or one expert projection) sorted by score get the ``high`` bit
width until ``high`` covers the fraction ``(budget - low) / (high - low)`` of the routed experts' weights; the
rest get ``low``. The average bits per routed-expert weight (scales excluded) is therefore at most ``budget``
and within one unit of it. The plan is a ``QuantConfig.expert_bits`` dict, recorded in the checkpoint.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from moeq.models import MoEAdapter

logger = logging.getLogger(__name__)

SCORES = ("outlier", "frequency", "affinity", "block")
GRANULARITIES = ("layer", "expert", "linear")


@torch.no_grad()
def outlier_scores(model: nn.Module, adapter: MoEAdapter) -> dict[str, dict[str, torch.Tensor]]:
    """``{experts module: {"gate_up": [E], "down": [E]}}`` column-outlier ratios (float32)."""
    out = {}
    for idx, block in adapter.moe_layers(model):
        ex = adapter.experts(block)
        scores = {}
        for proj, w in (("gate_up", ex.gate_up_proj), ("down", ex.down_proj)):
            a = w.detach().float().abs()  # [E, N, K]; columns = input features
            scores[proj] = a.amax(1).amax(-1) / a.mean((1, 2)).clamp_min(1e-12)
        out[adapter.experts_name(idx)] = scores
    return out


@torch.no_grad()
def routing_scores(model: nn.Module, adapter: MoEAdapter, ids: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """``{experts module: {"frequency": [E], "affinity": [E], "block": scalar}}`` from one forward over ``ids``."""
    stats, hooks = {}, []
    for idx, block in adapter.moe_layers(model):
        name = adapter.experts_name(idx)
        e = adapter.experts(block).num_experts if hasattr(adapter.experts(block), "num_experts") else \
            adapter.experts(block).gate_up_proj.shape[0]
        stats[name] = {"frequency": torch.zeros(e), "affinity": torch.zeros(e), "cos": [], "n": 0}

        def router_hook(mod, inp, out, s=stats[name]):
            _, w, i = out
            s["frequency"] += torch.bincount(i.reshape(-1).cpu(), minlength=len(s["frequency"])).float()
            s["affinity"].index_add_(0, i.reshape(-1).cpu(), w.reshape(-1).float().cpu())

        def layer_hook(mod, args, kwargs, out, s=stats[name]):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = out[0] if isinstance(out, tuple) else out
            s["cos"].append(F.cosine_similarity(x_in.float(), x_out.float(), dim=-1).mean().item())

        hooks.append(adapter.router(block).register_forward_hook(router_hook))
        hooks.append(adapter.layers(model)[idx].register_forward_hook(layer_hook, with_kwargs=True))
    try:
        dev = next(model.parameters()).device
        for j in range(ids.shape[0]):
            model(ids[j : j + 1].to(dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {n: {"frequency": s["frequency"], "affinity": s["affinity"],
                "block": torch.tensor(1.0 - sum(s["cos"]) / max(len(s["cos"]), 1))} for n, s in stats.items()}


def allocate_bits(units: list[tuple[object, int, float]], budget: float, low: int, high: int) -> dict[object, int]:
    """``{unit key: bits}`` for ``units = [(key, weights, score)]`` under an average of ``budget`` bits."""
    if not low <= budget <= high:
        raise ValueError(f"budget {budget} bits is outside [{low}, {high}]")
    total = sum(n for _, n, _ in units)
    allowance = 0.0 if high == low else (budget - low) / (high - low) * total
    plan, used = {}, 0
    for key, n, _ in sorted(units, key=lambda u: -u[2]):
        if used + n <= allowance + 1e-9:
            plan[key], used = high, used + n
        else:
            plan[key] = low
    return plan


def default_levels(budget: float, choices=(2, 3, 4, 8)) -> tuple[int, int]:
    """The two supported bit widths around ``budget`` (equal when it is one of them)."""
    lows = [c for c in choices if c <= budget]
    highs = [c for c in choices if c >= budget]
    if not lows or not highs:
        raise ValueError(f"budget {budget} outside the supported bit widths {choices}")
    return max(lows), min(highs)


def plan_mixed_precision(model: nn.Module, adapter: MoEAdapter, budget: float, score: str = "affinity",
                         granularity: str = "expert", levels: tuple[int, int] | None = None,
                         calib: torch.Tensor | None = None) -> dict[str, dict[str, list[int]]]:
    """A ``QuantConfig.expert_bits`` plan for the routed experts of ``model`` (full precision)."""
    if score not in SCORES or granularity not in GRANULARITIES:
        raise ValueError(f"score must be one of {SCORES} and granularity one of {GRANULARITIES}")
    if score != "outlier" and calib is None:
        raise ValueError(f"score {score!r} needs calibration tokens (calib=[n, L] ids)")
    low, high = levels or default_levels(budget)
    outl = outlier_scores(model, adapter)
    route = routing_scores(model, adapter, calib) if score != "outlier" else {}
    units = []
    for idx, block in adapter.moe_layers(model):
        name = adapter.experts_name(idx)
        ex = adapter.experts(block)
        e, two_i, h = ex.gate_up_proj.shape
        sizes = {"gate_up": two_i * h, "down": h * two_i // 2}
        for ei in range(e):
            for proj in ("gate_up", "down"):
                if score == "outlier":
                    s = float(outl[name][proj][ei])
                elif score == "block":
                    s = float(route[name]["block"]) + 1e-6 * float(route[name]["affinity"][ei])  # tie-break
                else:
                    s = float(route[name][score][ei])
                key = {"layer": (name,), "expert": (name, ei), "linear": (name, ei, proj)}[granularity]
                units.append((key, sizes[proj], s))
    merged: dict[tuple, list] = {}
    for key, n, s in units:  # a unit's weight count sums its parts; its score is their max
        m = merged.setdefault(key, [0, float("-inf")])
        m[0], m[1] = m[0] + n, max(m[1], s)
    plan = allocate_bits([(k, n, s) for k, (n, s) in merged.items()], budget, low, high)
    out: dict[str, dict[str, list[int]]] = {}
    for idx, block in adapter.moe_layers(model):
        name = adapter.experts_name(idx)
        e = adapter.experts(block).gate_up_proj.shape[0]
        out[name] = {proj: [plan[{"layer": (name,), "expert": (name, ei), "linear": (name, ei, proj)}[granularity]]
                            for ei in range(e)] for proj in ("gate_up", "down")}
    logger.info("mixed precision: %.3f average bits over routed experts (budget %.2f, levels %d/%d, %s by %s)",
                average_bits(model, adapter, out), budget, low, high, granularity, score)
    return out


def average_bits(model: nn.Module, adapter: MoEAdapter, plan: dict[str, dict[str, list[int]]]) -> float:
    """Average bits per routed-expert weight of a plan (scales and zeros excluded)."""
    bits = weights = 0
    for idx, block in adapter.moe_layers(model):
        ex = adapter.experts(block)
        e, two_i, h = ex.gate_up_proj.shape
        p = plan[adapter.experts_name(idx)]
        for ei in range(e):
            bits += p["gate_up"][ei] * two_i * h + p["down"][ei] * h * two_i // 2
            weights += two_i * h + h * two_i // 2
    return bits / max(weights, 1)
