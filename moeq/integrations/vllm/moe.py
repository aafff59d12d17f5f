"""vLLM ``FusedMoEMethodBase`` for moeq's packed routed experts (runs ``torch.ops.moeq.fused_experts``).

Storage per scheme group ``g`` (experts sharing one (gate_up, down) scheme, as ``MixedQuantizedExperts``
groups them), as buffers of vLLM's ``RoutedExperts`` layer, ``Ip`` = intermediate size per TP rank::

    moeq_g{g}_w13_qweight int32 [E_g, 2*Ip, H*b/32]   gate rows [0, Ip), up rows [Ip, 2*Ip)
    moeq_g{g}_w13_scales  16-bit [E_g, 2*Ip, H/g]      moeq_g{g}_w13_qzeros uint8 (asymmetric only)
    moeq_g{g}_w2_qweight  int32 [E_g, H, Ip*b/32]      moeq_g{g}_w2_scales [E_g, H, Ip/g], w2_qzeros

The checkpoint's per-expert keys (``experts.<e>.{gate,up,down}_proj.<field>``) reach vLLM's expert mapping as
``w13_<field>`` / ``w2_<field>``; those names are registered as empty handle parameters whose ``weight_loader``
copies each expert (global id -> local id for expert parallelism, TP slice on group boundaries) into its
group's buffers. ``apply`` does no host synchronisation (vLLM captures decode in CUDA graphs).
"""

from __future__ import annotations

import logging

import torch
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase

from moeq.integrations.vllm.shards import (FIELDS, MoeqServingError, check_k_split, expert_schemes, group_experts,
                                           narrow_k, narrow_n, route_to_group)

logger = logging.getLogger(__name__)

_SHARDS = {"w1": ("w13", 0), "w3": ("w13", 1), "w2": ("w2", None)}  # vLLM shard id -> (stack, half)
_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # vLLM shard id -> checkpoint projection


class MoeqFusedMoEMethod(FusedMoEMethodBase):
    """Routed experts of one moeq ``modules`` entry (``spec``) inside vLLM's fused-MoE layer."""

    def __init__(self, name: str, spec: dict, moe, backend: str = "auto"):
        super().__init__(moe)
        self.name, self.spec, self.backend = name, spec, backend
        self.schemes = expert_schemes(spec)
        self.online_hadamard = bool(spec.get("online_hadamard", False))
        if spec.get("activation", "silu") != "silu":
            raise MoeqServingError(f"{name}: activation {spec['activation']!r} is not served (silu only)")

    # ---- construction --------------------------------------------------------------------------------------
    def maybe_roundup_sizes(self, hidden_size, intermediate_size_per_partition, act_dtype, moe_parallel_config):
        return hidden_size, intermediate_size_per_partition  # packed shapes are fixed by the checkpoint

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra_weight_attrs):
        spec, name = self.spec, self.name
        h, i_full, ip = int(spec["hidden_dim"]), int(spec["intermediate_dim"]), intermediate_size_per_partition
        if (hidden_size, layer.global_num_experts) != (h, int(spec["num_experts"])):
            raise MoeqServingError(f"{name}: vLLM builds {layer.global_num_experts} experts of hidden size "
                                   f"{hidden_size}, the checkpoint has {spec['num_experts']} of {h}")
        act = getattr(layer.activation, "value", layer.activation)
        if str(act) != "silu":
            raise MoeqServingError(f"{name}: vLLM asks for activation {act!r}; moeq experts compute SiLU-gated MLPs")
        if getattr(layer, "apply_router_weight_on_input", False):
            raise MoeqServingError(f"{name}: apply_router_weight_on_input is not supported")
        self.ip = ip
        self.tp_size, self.tp_rank = layer.moe_config.moe_parallel_config.tp_size, layer.moe_config.moe_parallel_config.tp_rank
        if ip * self.tp_size != i_full:
            raise MoeqServingError(f"{name}: intermediate size {i_full} is not split evenly over TP={self.tp_size}")
        if self.online_hadamard and ip != i_full:
            raise MoeqServingError(
                f"{name}: the checkpoint uses an online Hadamard on the down-projection input (--rotate), which "
                f"mixes all {i_full} intermediate features, so they cannot be split over tensor-parallel ranks "
                f"(TP={self.tp_size}); serve it with expert parallelism (--enable-expert-parallel) or TP=1")
        for a, b in {(a, b) for a, b in self.schemes}:
            check_k_split(name, i_full, ip, b, f"tensor parallelism (TP={self.tp_size})")
        emap = layer.expert_map
        if emap is None:
            local_to_global = list(range(num_experts))
        else:
            emap_host = emap.tolist()  # load time, not in apply
            local_to_global = sorted(range(len(emap_host)), key=lambda e: emap_host[e])
            local_to_global = [e for e in local_to_global if emap_host[e] >= 0]
        if len(local_to_global) != num_experts:
            raise MoeqServingError(f"{name}: expert map gives {len(local_to_global)} local experts, layer has {num_experts}")
        self.global_to_local = {g: l for l, g in enumerate(local_to_global)}
        self.groups = group_experts(self.schemes, local_to_global)
        group_of = torch.empty(num_experts, dtype=torch.long)
        local_of = torch.empty(num_experts, dtype=torch.long)
        for g, (pair, members) in enumerate(self.groups):
            group_of[members] = g
            local_of[members] = torch.arange(len(members))
            for prefix, scheme, (n, k) in (("w13", pair[0], (2 * ip, h)), ("w2", pair[1], (h, ip))):
                for field, shape in scheme.shapes(n, k).items():
                    buf = torch.zeros(len(members), *shape, dtype=scheme.dtype(field))
                    layer.register_buffer(f"moeq_g{g}_{prefix}_{field}", buf, persistent=False)
        dev = layer.moe_config.device
        layer.register_buffer("moeq_group_of", group_of.to(dev), persistent=False)
        layer.register_buffer("moeq_local_of", local_of.to(dev), persistent=False)
        self._group_of_host, self._local_of_host = group_of.tolist(), local_of.tolist()
        self._loaded: set[tuple[int, str, str]] = set()
        zeros_used = any(not s.sym for pair, _ in self.groups for s in pair)
        for prefix in ("w13", "w2"):
            for field in FIELDS:
                if field == "qzeros" and not zeros_used:
                    continue
                handle = torch.nn.Parameter(torch.empty(0, dtype=torch.int32), requires_grad=False)
                handle.weight_loader = self._make_loader(layer)
                layer.register_parameter(f"{prefix}_{field}", handle)
        logger.info("%s: %d local experts in %d scheme group(s), TP %d/%d, online Hadamard %s", name, num_experts,
                    len(self.groups), self.tp_rank, self.tp_size, self.online_hadamard)

    def _make_loader(self, layer):
        def loader(param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
            ok = self._load(layer, loaded_weight, weight_name, shard_id, int(expert_id))
            return ok if return_success else None

        loader.supports_moe_loading = True
        return loader

    def _load(self, layer, w: torch.Tensor, weight_name: str, shard_id: str, global_id: int) -> bool:
        local = self.global_to_local.get(global_id)
        if local is None:
            return False  # another expert-parallel rank holds it
        field = weight_name.rsplit("_", 1)[-1]
        prefix, half = _SHARDS[shard_id]
        g, le = self._group_of_host[local], self._local_of_host[local]
        pair = self.groups[g][0]
        scheme = pair[0] if prefix == "w13" else pair[1]
        dst = getattr(layer, f"moeq_g{g}_{prefix}_{field}", None)
        key = f"{self.name}.{global_id}.{_PROJ[shard_id]}.{field}"
        if dst is None:
            raise MoeqServingError(f"{key}: the checkpoint stores {field} for an expert whose scheme has none")
        ip = self.ip
        if prefix == "w13":  # gate/up rows are output features: a plain row slice per TP rank
            src, view = narrow_n(w, ip, self.tp_rank), dst[le, half * ip:(half + 1) * ip]
        else:  # down's input features are packed: slice on word / group boundaries (checked at create)
            src, view = narrow_k(w, field, scheme, ip, self.tp_rank) if self.tp_size > 1 else w, dst[le]
        if tuple(src.shape) != tuple(view.shape) or src.dtype != view.dtype:
            raise MoeqServingError(f"{key}: stored {w.dtype} {tuple(w.shape)}, this rank expects {view.dtype} "
                                   f"{tuple(view.shape)} (TP={self.tp_size})")
        view.copy_(src)
        self._loaded.add((local, shard_id, field))
        return True

    def process_weights_after_loading(self, layer) -> None:
        missing = []
        for g, (pair, members) in enumerate(self.groups):
            for shard_id, (prefix, _) in _SHARDS.items():
                scheme = pair[0] if prefix == "w13" else pair[1]
                for field in FIELDS if not scheme.sym else FIELDS[:2]:
                    missing += [(m, shard_id, field) for m in members if (m, shard_id, field) not in self._loaded]
        if missing:
            raise MoeqServingError(f"{self.name}: {len(missing)} packed expert tensors missing from the checkpoint "
                                   f"(local expert, shard, field), e.g. {missing[:3]}")

    def get_fused_moe_quant_config(self, layer):
        return None  # moeq runs its own op, not one of vLLM's modular kernels

    # ---- forward -------------------------------------------------------------------------------------------
    def apply(self, layer, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
        """``x [T, H]``, ``topk_weights [T, k]`` float, ``topk_ids [T, k]`` int32 global ids -> ``[T, H]``
        (``x.dtype``), this rank's partial sum (vLLM all-reduces over TP/EP ranks)."""
        ids = topk_ids
        if layer.expert_map is not None:
            ids = layer.expert_map[ids.long()]  # -1 for experts held by other ranks: skipped by every backend
        if len(self.groups) == 1:
            return self._run(layer, 0, x, ids, topk_weights)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for g in range(len(self.groups)):
            local = route_to_group(ids, layer.moeq_group_of, layer.moeq_local_of, g)
            out += self._run(layer, g, x, local, topk_weights).float()
        return out.to(x.dtype)

    def _run(self, layer, g: int, x, ids, weights):
        pair = self.groups[g][0]
        get = lambda prefix, field: getattr(layer, f"moeq_g{g}_{prefix}_{field}", None)  # noqa: E731
        return torch.ops.moeq.fused_experts(
            x, ids, weights,
            get("w13", "qweight"), get("w13", "scales"), get("w13", "qzeros"),
            get("w2", "qweight"), get("w2", "scales"), get("w2", "qzeros"),
            pair[0].bits, pair[0].group_size, pair[1].bits, pair[1].group_size,
            "silu", self.online_hadamard, self.backend,
        )
