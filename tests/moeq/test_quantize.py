"""quantize_model on tiny models of every supported family: logits equal a fake-quant reference, generate
works, and everything but the routed experts keeps its original precision and values."""

import copy

import pytest
import torch

import moeq
from moeq.demo import _fake_quant_reference
from moeq.testing import TINY_CONFIGS, tiny_model


def _ids(vocab, t=12, b=2, seed=0):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_logits_match_fake_quant_reference(model_type):
    fp = tiny_model(model_type)
    model = copy.deepcopy(fp)
    report = moeq.quantize_model(model, moeq.QuantConfig(bits=4, group_size=32))
    ref = _fake_quant_reference(fp, model)
    ids = _ids(fp.config.vocab_size)
    with torch.no_grad():
        got, want, full = model(ids).logits, ref(ids).logits, fp(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32 tolerance
    assert (got - full).abs().max() > 1e-4  # and quantization really happened
    assert len(report.modules) == 2 * len(moeq.adapter_for(model).moe_layers(model))
    out = model.generate(ids[:1, :4], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "deepseek_v3"])
def test_everything_but_routed_experts_untouched(model_type):
    fp = tiny_model(model_type)
    model = copy.deepcopy(fp)
    moeq.quantize_model(model, moeq.QuantConfig(group_size=32))
    q_params = dict(model.named_parameters())
    for name, p in fp.named_parameters():
        if ".experts." in name and ("gate_up_proj" in name or "down_proj" in name) and "shared" not in name:
            assert name not in q_params  # replaced by packed buffers
        else:  # routers, shared experts, shared_expert_gate, attention, norms, embeddings, lm_head
            assert torch.equal(q_params[name], p) and q_params[name].dtype == p.dtype, name


def test_overrides_and_asymmetric_specs_are_honoured():
    model = tiny_model("mixtral")
    cfg = moeq.QuantConfig(bits=4, group_size=32, sym=False,
                           overrides={"model.layers.1.mlp.experts.down": {"bits": 8, "group_size": -1}})
    moeq.quantize_model(model, cfg)
    ex0, ex1 = (model.model.layers[i].mlp.experts for i in (0, 1))
    assert ex0.w2_spec == moeq.WeightSpec(4, 32, False) and ex0.w2_qzeros is not None
    # per-channel is stored resolved: one group spanning K = I = 64
    assert ex1.w2_spec == moeq.WeightSpec(8, 64, False) and ex1.w2_scales.shape[-1] == 1
    assert model.config.quantization_config["modules"]["model.layers.1.mlp.experts"]["down"]["bits"] == 8


def test_quantizing_twice_is_refused():
    model = tiny_model("olmoe")
    moeq.quantize_model(model, moeq.QuantConfig(group_size=32))
    with pytest.raises(ValueError, match="already quantized"):
        moeq.quantize_model(model, moeq.QuantConfig(group_size=32))


def test_unknown_method_lists_available():
    with pytest.raises(ValueError, match="available: .*rtn"):
        moeq.quantize_model(tiny_model("olmoe"), moeq.QuantConfig(method="awq"))


def test_group_size_not_dividing_dims_is_refused():
    with pytest.raises(ValueError, match="does not divide"):
        moeq.quantize_model(tiny_model("olmoe"), moeq.QuantConfig(group_size=48))


def test_bf16_model_uses_bf16_scales_and_runs():
    model = tiny_model("qwen3_moe", dtype=torch.bfloat16)
    moeq.quantize_model(model, moeq.QuantConfig(group_size=32))
    ex = model.model.layers[0].mlp.experts
    assert ex.w13_scales.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(_ids(256)).logits.float()).all()


def test_float_cast_keeps_scales_16bit():
    model = tiny_model("olmoe", dtype=torch.bfloat16)
    moeq.quantize_model(model, moeq.QuantConfig(group_size=32))
    model.float()
    ex = model.model.layers[0].mlp.experts
    assert ex.w13_scales.dtype == torch.bfloat16 and ex.w13_qweight.dtype == torch.int32
