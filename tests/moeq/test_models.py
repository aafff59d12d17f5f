"""Adapters: every supported family is recognised and its structure found; others are refused clearly."""

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

import moeq
from moeq.models import UnsupportedModelError, adapter_for
from moeq.testing import TINY_CONFIGS, tiny_model


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_adapter_finds_moe_layers_and_parts(model_type):
    model = tiny_model(model_type)
    ad = adapter_for(model)
    ad.check(model)
    layers = ad.moe_layers(model)
    cfg = model.config
    dense = getattr(cfg, "first_k_dense_replace", 0) or 0
    assert [i for i, _ in layers] == list(range(dense, cfg.num_hidden_layers))  # dense first layers skipped
    for _, block in layers:
        ex = ad.experts(block)
        assert ex.gate_up_proj.shape[0] == getattr(cfg, ad.num_experts_key)
        assert ex.down_proj.shape[-1] == getattr(cfg, ad.intermediate_key)
        assert ad.router(block).weight.shape == (getattr(cfg, ad.num_experts_key), cfg.hidden_size)
        shared = ad.shared_expert(block)
        assert (shared is not None) == (model_type in ("qwen2_moe", "deepseek_v2", "deepseek_v3"))
        assert (ad.shared_gate(block) is not None) == (model_type == "qwen2_moe")


def test_unsupported_architecture_lists_supported_ones():
    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, vocab_size=64)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedModelError, match="llama.*mixtral.*olmoe.*qwen2_moe"):
        moeq.quantize_model(model)


def test_unsupported_activation_refused():
    model = tiny_model("mixtral", hidden_act="gelu")
    with pytest.raises(UnsupportedModelError, match="hidden_act"):
        adapter_for(model).check(model)


def test_expert_count_read_from_modules_not_hardcoded():
    model = tiny_model("olmoe", num_experts=6, num_experts_per_tok=3)
    ad = adapter_for(model)
    ad.check(model)
    assert all(ad.experts(b).gate_up_proj.shape[0] == 6 for _, b in ad.moe_layers(model))


def test_mismatched_config_detected():
    model = tiny_model("olmoe")
    model.config.num_experts = 5
    with pytest.raises(UnsupportedModelError, match="num_experts=5"):
        adapter_for(model).check(model)
