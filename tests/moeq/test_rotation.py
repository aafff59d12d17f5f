"""Rotation: the rotated full-precision model computes the same function and routes identically; the
online Hadamard is exact; rotation lowers quantization error on weights with outlier channels."""

import copy

import pytest
import torch

import moeq
from moeq.models import adapter_for
from moeq.rotation import RotationError, rotate_model
from moeq.testing import HadamardDownExperts, logits_and_routing, TINY_CONFIGS, tiny_model

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def _fp64_model(model_type, **kw):
    model = tiny_model(model_type, dtype=torch.float64, **kw)
    with torch.no_grad():  # non-trivial norm scales, so fusing them matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
    return model


def _routing(model):
    return logits_and_routing(model, IDS)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_rotated_model_is_equivalent_and_routes_identically(model_type):
    model = _fp64_model(model_type)
    rotated = copy.deepcopy(model)
    rotate_model(rotated, adapter_for(rotated), seed=3, online_hadamard=False)
    (a, ra), (b, rb) = _routing(model), _routing(rotated)
    # RMSNorm computes in float32 inside transformers, so float64 models agree to ~1e-7, not 1e-15
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(x, y) for x, y in zip(ra, rb))
    ad = adapter_for(rotated)
    assert not torch.allclose(ad.experts(ad.moe_layers(rotated)[0][1]).gate_up_proj,
                              ad.experts(ad.moe_layers(model)[0][1]).gate_up_proj)  # weights really changed


@pytest.mark.parametrize("model_type", ["qwen2_moe", "deepseek_v2"])
def test_online_hadamard_on_down_is_exact(model_type):
    model = _fp64_model(model_type)
    rotated = copy.deepcopy(model)
    ad = adapter_for(rotated)
    rotate_model(rotated, ad, seed=1, online_hadamard=True)
    for _, block in ad.moe_layers(rotated):
        setattr(block, ad.experts_attr, HadamardDownExperts(ad.experts(block)))
    torch.testing.assert_close(_routing(rotated)[0], _routing(model)[0], rtol=1e-5, atol=1e-5)


def test_tied_embeddings_are_untied():
    model = _fp64_model("qwen3_moe", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    rotated = copy.deepcopy(model)
    rotate_model(rotated, adapter_for(rotated), online_hadamard=False)
    assert rotated.lm_head.weight is not rotated.model.embed_tokens.weight
    torch.testing.assert_close(_routing(rotated)[0], _routing(model)[0], rtol=1e-5, atol=1e-5)


def test_unsupported_hidden_size_is_named():
    model = tiny_model("olmoe", hidden_size=72, num_attention_heads=4, num_key_value_heads=4)  # 72 = 9 * 8
    with pytest.raises(RotationError, match="hidden size 72"):
        rotate_model(model, adapter_for(model))


def test_rotating_a_quantized_model_is_refused():
    model = tiny_model("olmoe")
    moeq.quantize_model(model, moeq.QuantConfig(group_size=32))
    with pytest.raises(RotationError, match="already quantized"):
        rotate_model(model, adapter_for(model))


def test_online_hadamard_requires_rotation():
    with pytest.raises(ValueError, match="online_hadamard needs rotation"):
        moeq.QuantConfig(online_hadamard=True)


def _outlier_model():
    # a few input channels of every expert weight 20x larger: per-group scales are dominated by them
    model = tiny_model("mixtral")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj[:, :, [3, 40]] *= 20
            layer.mlp.experts.down_proj[:, [5, 17], :] *= 20
    return model


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_rotation_lowers_quantization_error_with_outliers(method):
    fp = _outlier_model()
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = fp(IDS).logits
    errs = {}
    for rot in (None, "hadamard"):
        model = copy.deepcopy(fp)
        cfg = moeq.QuantConfig(method=method, bits=4, group_size=32, rotation=rot, online_hadamard=rot is not None)
        moeq.quantize_model(model, cfg, calib=calib)
        with torch.no_grad():
            errs[rot] = float((model(IDS).logits - ref).pow(2).mean())
    assert errs["hadamard"] < errs[None]


def test_rotated_checkpoint_roundtrip(tmp_path):
    model = tiny_model("qwen2_moe")
    moeq.quantize_model(model, moeq.QuantConfig(group_size=32, rotation="hadamard", online_hadamard=True))
    moeq.save_quantized(model, tmp_path)
    loaded = moeq.load_quantized(tmp_path)
    assert loaded.model.layers[0].mlp.experts.online_hadamard
    q = loaded.config.quantization_config
    assert q["rotation"] == "hadamard" and q["modules"]["model.layers.0.mlp.experts"]["online_hadamard"]
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
