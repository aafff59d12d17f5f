"""One adapter entry per supported MoE family (transformers v5 module names)."""

from __future__ import annotations

from moeq.models.base import MoEAdapter, register_adapter

MIXTRAL = register_adapter(MoEAdapter(
    name="mixtral", model_types=("mixtral",),
    num_experts_key="num_local_experts", intermediate_key="intermediate_size",
    dense_layers_note="every layer is MoE",
    hub_renames=((".mlp.", ".block_sparse_moe."),), hub_expert_proj=("w1", "w3", "w2"),
))

QWEN2_MOE = register_adapter(MoEAdapter(
    name="qwen2_moe", model_types=("qwen2_moe",),
    num_experts_key="num_experts", intermediate_key="moe_intermediate_size",
    shared_attr="shared_expert", shared_gate_attr="shared_expert_gate",
    dense_layers_note="dense where layer_idx in mlp_only_layers or (layer_idx + 1) % decoder_sparse_step != 0",
))

QWEN3_MOE = register_adapter(MoEAdapter(
    name="qwen3_moe", model_types=("qwen3_moe",),
    num_experts_key="num_experts", intermediate_key="moe_intermediate_size",
    dense_layers_note="dense where layer_idx in mlp_only_layers or (layer_idx + 1) % decoder_sparse_step != 0",
))

DEEPSEEK_V2 = register_adapter(MoEAdapter(
    name="deepseek_v2", model_types=("deepseek_v2",),
    num_experts_key="n_routed_experts", intermediate_key="moe_intermediate_size",
    shared_attr="shared_experts",
    dense_layers_note="layers < first_k_dense_replace are dense",
))

DEEPSEEK_V3 = register_adapter(MoEAdapter(
    name="deepseek_v3", model_types=("deepseek_v3",),
    num_experts_key="n_routed_experts", intermediate_key="moe_intermediate_size",
    shared_attr="shared_experts",
    dense_layers_note="layers < first_k_dense_replace are dense",
))

OLMOE = register_adapter(MoEAdapter(
    name="olmoe", model_types=("olmoe",),
    num_experts_key="num_experts", intermediate_key="intermediate_size",
    dense_layers_note="every layer is MoE",
))

ALL = (MIXTRAL, QWEN2_MOE, QWEN3_MOE, DEEPSEEK_V2, DEEPSEEK_V3, OLMOE)
