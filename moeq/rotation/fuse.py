"""Fold RMSNorm scales into the linears that read the normalized stream (the first step of rotation).

``RMSNorm(x) = x / rms(x) * g`` feeds linears ``y = RMSNorm(x) W^T``; with ``W <- W diag(g)`` and ``g <- 1``
the output is unchanged, and the norm becomes a pure ``x / rms(x)``, which commutes with an orthogonal
rotation of ``x``.
"""

from __future__ import annotations

import torch
from torch import nn

from moeq.models import MoEAdapter


def _fold(norm: nn.Module, weights: list[torch.Tensor]) -> None:
    g = norm.weight.double()
    for w in weights:
        w.data.copy_((w.double() * g.to(w.device)).to(w.dtype))
    norm.weight.data.fill_(1.0)


def _readers_after_attention(layer: nn.Module, adapter: MoEAdapter) -> list[torch.Tensor]:
    block = adapter.moe_block(layer)
    if block is None:
        mlp = getattr(layer, adapter.mlp_attr)
        return [getattr(mlp, n).weight for n in ("gate_proj", "up_proj")]
    out = [adapter.router(block).weight, adapter.experts(block).gate_up_proj]
    shared = adapter.shared_expert(block)
    if shared is not None:
        out += [shared.gate_proj.weight, shared.up_proj.weight]
    gate = adapter.shared_gate(block)
    if gate is not None:
        out.append(gate.weight)
    return out


@torch.no_grad()
def fuse_layer_norms(layer: nn.Module, adapter: MoEAdapter) -> None:
    """Fold one decoder layer's ``input_layernorm`` into its attention readers and ``post_attention_layernorm``
    into router, shared-expert gate, routed and shared gate/up (or the dense MLP)."""
    attn = getattr(layer, adapter.attn_attr)
    readers = [getattr(attn, n).weight for n in adapter.attn_readers if isinstance(getattr(attn, n, None), nn.Linear)]
    _fold(getattr(layer, adapter.input_norm_attr), readers)
    _fold(getattr(layer, adapter.post_attn_norm_attr), _readers_after_attention(layer, adapter))


@torch.no_grad()
def fuse_final_norm(model: nn.Module, adapter: MoEAdapter) -> None:
    """Fold the final norm into ``lm_head``."""
    _fold(model.get_submodule(adapter.final_norm_path), [model.get_submodule(adapter.lm_head_path).weight])


@torch.no_grad()
def fuse_norms(model: nn.Module, adapter: MoEAdapter) -> None:
    """:func:`fuse_layer_norms` for every layer, then :func:`fuse_final_norm` (each fold touches its own
    tensors only, so the streaming pipeline applies them layer by layer with the same result)."""
    for layer in adapter.layers(model):
        fuse_layer_norms(layer, adapter)
    fuse_final_norm(model, adapter)
