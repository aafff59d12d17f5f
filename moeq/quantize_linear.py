"""Which plain linears of a decoder layer get quantized (besides routed experts), and swapping them in."""

from __future__ import annotations

import logging

import torch
from torch import nn

from moeq.config import QuantConfig, WeightSpec
from moeq.models import MoEAdapter
from moeq.nn.linear import QuantizedLinear
from moeq.quantizers.rtn import rtn_quantize

logger = logging.getLogger(__name__)

# Linears whose inputs depend on other linears of the same sub-module: they are calibrated in stage 2, after
# the stage-1 linears are quantized (see moeq.runner).
STAGE2_LEAVES = ("o_proj", "down_proj")


def _packable(linear: nn.Linear, spec: WeightSpec) -> str | None:
    k = linear.in_features
    g = k if spec.group_size == -1 else spec.group_size
    if (k * spec.bits) % 32 or k % g:
        return f"in_features={k} is not a multiple of group size {g} / of {32 // _gcd(spec.bits, 32)} values"
    return None


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def linear_targets(layer: nn.Module, adapter: MoEAdapter, config: QuantConfig, prefix: str) -> dict[str, tuple[nn.Linear, int]]:
    """``{qualified name: (linear, stage)}`` of the layer's plain linears selected by ``config.quantize_linears``.

    Linears whose input width cannot be packed with their spec are kept in 16-bit, with a warning naming them.
    """
    groups = set(config.quantize_linears)
    roots: list[tuple[str, nn.Module]] = []
    block = adapter.moe_block(layer)
    if "attention" in groups:
        roots.append((adapter.attn_attr, getattr(layer, adapter.attn_attr)))
    if "shared_experts" in groups and block is not None and adapter.shared_attr:
        roots.append((f"{adapter.mlp_attr}.{adapter.shared_attr}", adapter.shared_expert(block)))
    if "dense_mlp" in groups and block is None:
        roots.append((adapter.mlp_attr, getattr(layer, adapter.mlp_attr)))
    out = {}
    for root_name, root in roots:
        for name, mod in root.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            full = f"{prefix}.{root_name}.{name}"
            why = _packable(mod, config.spec_for(full, "linear"))
            if why:
                logger.warning("%s kept in 16-bit: %s", full, why)
                continue
            out[full] = (mod, 2 if name.rpartition(".")[2] in STAGE2_LEAVES else 1)
    return out


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def quantize_linear_rtn(linear: nn.Linear, spec: WeightSpec, config: QuantConfig) -> QuantizedLinear:
    """RTN of one ``nn.Linear`` (weight ``[N, K]``) into a :class:`QuantizedLinear`."""
    w = linear.weight.detach()
    packed = rtn_quantize(w, spec, config.resolve_scale_dtype(w.dtype), config.w_clip, config.clip_grid,
                          config.clip_max_shrink, config.clip_norm)
    return QuantizedLinear.from_packed(packed, linear.bias, config.backend)


@torch.no_grad()
def round_router(router: nn.Module) -> float:
    """Round a router's ``weight [E, H]`` to a symmetric 8-bit per-output-channel grid in place; returns the
    relative change. The routers stay 16-bit tensors: they are a negligible share of memory, and this makes
    routing exactly what an 8-bit router computes."""
    w = router.weight
    s = (w.float().abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
    q = (torch.round(w.float() / s).clamp(-127, 127) * s).to(w.dtype)
    rel = float((q.float() - w.float()).norm() / w.float().norm().clamp_min(1e-30))
    w.copy_(q)
    return rel
