"""Architecture adapters: where each MoE family keeps its router, routed experts, shared experts and norms.

One small :class:`MoEAdapter` entry per family (``families.py``); the calibration loop, quantizers, rotation
and checkpoint code are model-agnostic and ask the adapter. Nothing here hard-codes expert counts: they are
read from the experts modules (and cross-checked against the config).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

_ADAPTERS: dict[str, "MoEAdapter"] = {}


class UnsupportedModelError(ValueError):
    """The model's architecture has no adapter, or its experts use a layout moeq cannot quantize."""


@dataclass(frozen=True)
class MoEAdapter:
    """Where things live in one MoE family's decoder layers (attribute names relative to a layer).

    Attributes:
        name: family name, e.g. ``"qwen2_moe"``.
        model_types: ``config.model_type`` values served.
        num_experts_key: config attribute holding the routed expert count.
        intermediate_key: config attribute holding the routed expert intermediate size.
        layers_path: dotted path from the CausalLM to the list of decoder layers.
        mlp_attr / router_attr / experts_attr: the MoE block in a layer, its router and routed experts.
        shared_attr: the shared expert MLP in the MoE block (gate_proj/up_proj/down_proj), if any.
        shared_gate_attr: the sigmoid gate of the shared expert (Qwen2-MoE), if any.
        attn_attr: the attention module of a layer.
        input_norm_attr / post_attn_norm_attr: the RMSNorms before attention and before the MLP.
        final_norm_path / embed_path / lm_head_path: model-level modules.
        dense_layers_note: how the family decides which layers are dense (documentation only; detection is
            structural: a layer is MoE iff its MLP has a routed-experts module).
    """

    name: str
    model_types: tuple[str, ...]
    num_experts_key: str
    intermediate_key: str
    layers_path: str = "model.layers"
    mlp_attr: str = "mlp"
    router_attr: str = "gate"
    experts_attr: str = "experts"
    shared_attr: str | None = None
    shared_gate_attr: str | None = None
    attn_attr: str = "self_attn"
    input_norm_attr: str = "input_layernorm"
    post_attn_norm_attr: str = "post_attention_layernorm"
    final_norm_path: str = "model.norm"
    embed_path: str = "model.embed_tokens"
    lm_head_path: str = "lm_head"
    dense_layers_note: str = ""
    activations: tuple[str, ...] = field(default=("silu",))
    # Attention linears reading the residual stream (after input_layernorm) and writing it; names absent
    # from a module are skipped (MHA: q/k/v; DeepSeek MLA: q_proj or q_a_proj, kv_a_proj_with_mqa).
    attn_readers: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "q_a_proj", "kv_a_proj_with_mqa")
    attn_writers: tuple[str, ...] = ("o_proj",)
    # Names in the family's original (hub) checkpoints, which serving engines load: substring renames of the
    # transformers v5 module names, and the per-expert projection names for (gate, up, down).
    hub_renames: tuple[tuple[str, str], ...] = ()
    hub_expert_proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    def hub_name(self, name: str) -> str:
        """The original-checkpoint name of a transformers v5 tensor or module name."""
        for old, new in self.hub_renames:
            name = name.replace(old, new)
        return name

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.layers_path)

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        """The layer's MoE block, or None for a dense layer."""
        mlp = getattr(layer, self.mlp_attr, None)
        return mlp if mlp is not None and hasattr(mlp, self.experts_attr) else None

    def moe_layers(self, model: nn.Module) -> list[tuple[int, nn.Module]]:
        """``(layer index, MoE block)`` of every MoE layer, in order."""
        out = []
        for i, layer in enumerate(self.layers(model)):
            block = self.moe_block(layer)
            if block is not None:
                out.append((i, block))
        return out

    def experts_name(self, layer_idx: int) -> str:
        """Fully qualified module name of a layer's routed experts."""
        return f"{self.layers_path}.{layer_idx}.{self.mlp_attr}.{self.experts_attr}"

    def experts(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.experts_attr)

    def router(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.router_attr)

    def shared_expert(self, block: nn.Module) -> nn.Module | None:
        return getattr(block, self.shared_attr) if self.shared_attr else None

    def shared_gate(self, block: nn.Module) -> nn.Module | None:
        return getattr(block, self.shared_gate_attr) if self.shared_gate_attr else None

    def check(self, model: nn.Module) -> None:
        """Raise :class:`UnsupportedModelError` when the model's experts deviate from the layout moeq packs:
        fused ``gate_up_proj [E, 2I, H]`` (gate rows first) and ``down_proj [E, H, I]``, no bias, SiLU."""
        cfg = model.config
        act = getattr(cfg, "hidden_act", "silu")
        if act not in self.activations:
            raise UnsupportedModelError(f"{self.name}: hidden_act={act!r} is not supported (expected {self.activations})")
        blocks = self.moe_layers(model)
        if not blocks:
            raise UnsupportedModelError(f"{self.name}: no MoE layer found under {self.layers_path}")
        want_e = getattr(cfg, self.num_experts_key)
        for i, block in blocks:
            ex = self.experts(block)
            if getattr(ex, "is_transposed", False) or not getattr(ex, "is_concatenated", True):
                raise UnsupportedModelError(f"{self.experts_name(i)}: transposed or interleaved expert weights")
            if getattr(ex, "has_bias", False):
                raise UnsupportedModelError(f"{self.experts_name(i)}: expert biases are not supported")
            if _is_quantized(ex):
                continue
            gu, dn = getattr(ex, "gate_up_proj", None), getattr(ex, "down_proj", None)
            if not isinstance(gu, torch.Tensor) or gu.dim() != 3 or not isinstance(dn, torch.Tensor) or dn.dim() != 3:
                raise UnsupportedModelError(f"{self.experts_name(i)}: expected 3-D gate_up_proj and down_proj parameters")
            e, two_i, h = gu.shape
            if (dn.shape[0], dn.shape[1], 2 * dn.shape[2]) != (e, h, two_i) or e != want_e:
                raise UnsupportedModelError(
                    f"{self.experts_name(i)}: gate_up_proj {tuple(gu.shape)} / down_proj {tuple(dn.shape)} do not "
                    f"match config.{self.num_experts_key}={want_e}"
                )


def _is_quantized(module: nn.Module) -> bool:
    return hasattr(module, "locate")  # QuantizedExperts / MixedQuantizedExperts


def _get(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def register_adapter(adapter: MoEAdapter) -> MoEAdapter:
    for mt in adapter.model_types:
        _ADAPTERS[mt] = adapter
    return adapter


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_for(model_or_config) -> MoEAdapter:
    """The adapter of a model (or config) by its ``model_type``; raises :class:`UnsupportedModelError`
    listing the supported types otherwise."""
    cfg = getattr(model_or_config, "config", model_or_config)
    mt = getattr(cfg, "model_type", None)
    if mt not in _ADAPTERS:
        raise UnsupportedModelError(
            f"model_type {mt!r} is not supported by moeq; supported: {', '.join(supported_model_types())}"
        )
    return _ADAPTERS[mt]
