"""Tiny MoE models built from real transformers configs (tests, demo, CPU benchmarks).

Every supported family gets a config with its real structure (shared experts, dense first layers,
sigmoid shared-expert gate, ...) scaled down so a forward pass takes milliseconds on a CPU. Dims are
multiples of 32 so every group size of the tests divides them.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

_COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
               max_position_embeddings=256, num_hidden_layers=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)

TINY_CONFIGS: dict[str, dict] = {
    "mixtral": dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                      num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen3_moe": dict(intermediate_size=128, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                      decoder_sparse_step=1, mlp_only_layers=[], head_dim=16),
    "deepseek_v2": dict(intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3, kv_lora_rank=16,
                        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1,
                        topk_group=1),
    "deepseek_v3": dict(intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3, kv_lora_rank=16,
                        q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=2,
                        topk_group=1),
    "olmoe": dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2),
}


def tiny_config(model_type: str, **overrides):
    """A scaled-down real transformers config of ``model_type`` (a key of :data:`TINY_CONFIGS`)."""
    if model_type not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for {model_type!r}; have {sorted(TINY_CONFIGS)}")
    return AutoConfig.for_model(model_type, **{**_COMMON, **TINY_CONFIGS[model_type], **overrides})


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialized tiny model (eval mode). Router weights are re-drawn so routing is not degenerate
    (some families initialize routers to zeros, which routes every token to the same experts)."""
    torch.manual_seed(seed)
    # grouped_mm (transformers' default experts path) has no float64 kernel; float64 models use the eager loop
    kwargs = {"experts_implementation": "eager"} if dtype == torch.float64 else {}
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=dtype, **kwargs).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight") or p.dim() == 3:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.1)
    return model


def tiny_tokenizer():
    """A byte-level tokenizer with exactly 256 ids (one per byte), built offline with ``tokenizers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def logits_and_routing(model, ids):
    """``(logits, [sorted top-k expert ids per MoE layer])`` of one no-grad forward over ``ids [B, L]``."""
    from moeq.models import adapter_for

    ad = adapter_for(model)
    seen = []
    hooks = [ad.router(b).register_forward_hook(lambda m, i, o: seen.append(o[2].sort(-1).values))
             for _, b in ad.moe_layers(model)]
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, seen


class HadamardDownExperts(torch.nn.Module):
    """Eager experts applying the online Hadamard to the down input (what ``QuantizedExperts`` does), over the
    dense ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]`` of a full-precision experts module: the float
    oracle of a rotated (and smoothed) model before quantization. Token by token, for tiny test models."""

    def __init__(self, experts):
        super().__init__()
        self.ex = experts

    def forward(self, hidden, idx, w):
        import torch.nn.functional as F

        from moeq_kernels.reference import hadamard_ref

        out = torch.zeros_like(hidden)
        for t in range(hidden.shape[0]):
            for j in range(idx.shape[1]):
                e = int(idx[t, j])
                gate, up = F.linear(hidden[t], self.ex.gate_up_proj[e]).chunk(2)
                out[t] += w[t, j] * F.linear(hadamard_ref(F.silu(gate) * up), self.ex.down_proj[e])
        return out
