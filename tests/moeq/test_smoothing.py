"""EAQuant smoothing: folding is exact for every family (routing unchanged), the scales follow the documented
formulas on hand-built statistics and on statistics captured independently, and mistakes are named."""

import copy

import pytest
import torch

import moeq
from moeq.models import adapter_for
from moeq.smoothing import aggregate_scales, smooth_model, smooth_scales
from moeq.testing import HadamardDownExperts, logits_and_routing, TINY_CONFIGS, tiny_model

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))


def _fp64_model(model_type, **kw):
    model = tiny_model(model_type, dtype=torch.float64, **kw)
    with torch.no_grad():  # non-trivial norm scales and a few activation outlier channels
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
                if "post_attention" in name:
                    p[[3, 40]] *= 8
    return model


def _routing(model):
    return logits_and_routing(model, IDS)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_smoothing_is_exact_and_routes_identically(model_type):
    model = _fp64_model(model_type)
    smoothed = copy.deepcopy(model)
    ad = adapter_for(smoothed)
    rep = smooth_model(smoothed, ad, CALIB, alpha=0.5, aggregation="max", down_proj=True)
    (a, ra), (b, rb) = _routing(model), _routing(smoothed)
    # RMSNorm computes in float32 inside transformers (DeepSeek routers too), hence not 1e-15
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(x, y) for x, y in zip(ra, rb))
    (i, blk), (_, blk0) = ad.moe_layers(smoothed)[0], ad.moe_layers(model)[0]
    assert not torch.allclose(blk.experts.gate_up_proj, blk0.experts.gate_up_proj)
    assert not torch.allclose(blk.experts.down_proj, blk0.experts.down_proj)
    if ad.shared_attr:
        sh, sh0 = ad.shared_expert(blk), ad.shared_expert(blk0)
        assert not torch.allclose(sh.down_proj.weight, sh0.down_proj.weight)
    assert set(rep.layers) == {ad.experts_name(j) for j, _ in ad.moe_layers(smoothed)}
    assert rep.layers[ad.experts_name(i)]["tokens"] == CALIB.numel()


@pytest.mark.parametrize("aggregation", ["frequency", "router_prob"])
def test_weighted_aggregations_are_exact_too(aggregation):
    model = _fp64_model("qwen2_moe")
    smoothed = copy.deepcopy(model)
    smooth_model(smoothed, adapter_for(smoothed), CALIB, alpha=0.7, aggregation=aggregation)
    torch.testing.assert_close(_routing(smoothed)[0], _routing(model)[0], rtol=1e-5, atol=1e-5)


def test_down_smoothing_alone_is_exact_and_keeps_the_input_side():
    model = _fp64_model("deepseek_v2")
    smoothed = copy.deepcopy(model)
    ad = adapter_for(smoothed)
    smooth_model(smoothed, ad, CALIB, alpha=0.0, down_proj=True)  # alpha 0: s = 1 / max|W| on the input side
    torch.testing.assert_close(_routing(smoothed)[0], _routing(model)[0], rtol=1e-5, atol=1e-5)
    plain = copy.deepcopy(model)
    smooth_model(plain, adapter_for(plain), CALIB, alpha=0.0, down_proj=False)
    (_, b), (_, p) = ad.moe_layers(smoothed)[0], ad.moe_layers(plain)[0]
    torch.testing.assert_close(p.experts.down_proj, ad.moe_layers(model)[0][1].experts.down_proj, rtol=0, atol=0)
    inter = b.experts.down_proj.shape[-1]
    torch.testing.assert_close(b.experts.gate_up_proj[:, :inter], p.experts.gate_up_proj[:, :inter], rtol=0, atol=0)


def test_scale_formula_and_aggregations_on_a_hand_built_case():
    torch.testing.assert_close(smooth_scales(torch.tensor([4.0, 9.0]), torch.tensor([1.0, 4.0]), 0.5),
                               torch.tensor([2.0, 1.5], dtype=torch.float64))
    s_e = torch.tensor([[1.0, 4.0], [2.0, 2.0], [8.0, 1.0]])  # expert 2 saw no token: left out
    counts, probs, s_0 = torch.tensor([1.0, 3.0, 0.0]), torch.tensor([0.5, 1.5, 0.0]), torch.tensor([3.0, 3.0])
    f64 = {"dtype": torch.float64}
    torch.testing.assert_close(aggregate_scales(s_e, counts, probs, "max", s_0, 4.0), torch.tensor([3.0, 4.0], **f64))
    torch.testing.assert_close(aggregate_scales(s_e, counts, probs, "frequency", s_0, 4.0),
                               torch.tensor([19 / 8, 22 / 8], **f64))
    torch.testing.assert_close(aggregate_scales(s_e, counts, probs, "router_prob", s_0, 4.0),
                               torch.tensor([15.5 / 6, 17 / 6], **f64))
    torch.testing.assert_close(aggregate_scales(s_e, counts, probs, "max"), torch.tensor([2.0, 4.0], **f64))


def _reference_max_scales(model, calib_ids, mask, alpha):
    """Per MoE layer, ``s = max_e s_e`` from MoE inputs and routing captured with plain hooks (Mixtral: no
    shared expert), padding dropped."""
    ad = adapter_for(model)
    xs, idxs = {i: [] for i, _ in ad.moe_layers(model)}, {i: [] for i, _ in ad.moe_layers(model)}
    hooks = []
    for i, b in ad.moe_layers(model):
        hooks.append(b.register_forward_pre_hook(lambda m, a, i=i: xs[i].append(a[0].reshape(-1, a[0].shape[-1]))))
        hooks.append(ad.router(b).register_forward_hook(lambda m, a, o, i=i: idxs[i].append(o[2])))
    with torch.no_grad():
        for j in range(calib_ids.shape[0]):
            model(calib_ids[j : j + 1], attention_mask=mask[j : j + 1])
    for h in hooks:
        h.remove()
    out = {}
    for i, b in ad.moe_layers(model):
        keep = mask.reshape(-1) > 0
        x, idx = torch.cat(xs[i])[keep], torch.cat(idxs[i])[keep]
        w = b.experts.gate_up_proj.detach()
        s = torch.stack([smooth_scales(x[(idx == e).any(-1)].abs().amax(0), w[e].abs().amax(0), alpha)
                         for e in range(w.shape[0]) if (idx == e).any()])
        out[i] = s.amax(0)
    return out


def test_folded_scales_match_independently_captured_statistics():
    model = _fp64_model("mixtral")
    mask = torch.ones_like(CALIB)
    mask[1, 10:] = 0  # padding must not enter any statistic
    want = _reference_max_scales(model, CALIB, mask, alpha=0.6)
    smoothed = copy.deepcopy(model)
    smooth_model(smoothed, adapter_for(smoothed), {"input_ids": CALIB, "attention_mask": mask}, alpha=0.6,
                 down_proj=False)
    for i, s in want.items():
        g0, g1 = model.model.layers[i].post_attention_layernorm.weight, smoothed.model.layers[i].post_attention_layernorm.weight
        torch.testing.assert_close(g0 / g1, s, rtol=1e-6, atol=0)  # statistics are float32


def test_quantize_model_with_smoothing_records_it():
    model = tiny_model("qwen2_moe")
    cfg = moeq.QuantConfig(method="rtn", bits=4, group_size=32, smooth=True, smooth_aggregation="frequency")
    report = moeq.quantize_model(model, cfg, calib=CALIB)
    sm = report.calibration["smoothing"]
    assert sm["aggregation"] == "frequency" and sm["alpha"] == 0.5 and sm["down_proj"] is True
    assert set(sm["layers"]) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    assert report.calibration["_samples"]["tokens"] == CALIB.numel()
    assert model.config.quantization_config["smooth"] is True


@pytest.mark.parametrize("kwargs,match", [
    ({"smooth_aggregation": "mean"}, "smooth_aggregation"),
    ({"smooth_alpha": 1.5}, "smooth_alpha"),
])
def test_bad_smoothing_configs_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        moeq.QuantConfig(**kwargs)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "deepseek_v2", "mixtral"])
def test_rotation_then_smoothing_then_online_hadamard_is_exact(model_type):
    """The composition quantize_model applies (rotate, smooth in the rotated basis, online Hadamard on the smoothed
    down weights) computes the original function in float; each step really changed the weights."""
    from moeq.quantize import transform_model

    model = _fp64_model(model_type)
    composed = copy.deepcopy(model)
    ad = adapter_for(composed)
    cfg = moeq.QuantConfig(rotation="hadamard", online_hadamard=True, smooth=True, rotation_seed=2)
    rec = transform_model(composed, ad, cfg, CALIB)
    assert set(rec["smoothing"]["layers"]) == {ad.experts_name(i) for i, _ in ad.moe_layers(composed)}
    i, blk = ad.moe_layers(composed)[0]
    norm = getattr(ad.layers(composed)[i], ad.post_attn_norm_attr).weight
    assert not torch.allclose(norm, torch.ones_like(norm))  # smoothing survived rotation's norm fusion (1 / s)
    for _, block in ad.moe_layers(composed):
        setattr(block, ad.experts_attr, HadamardDownExperts(ad.experts(block)))
    (a, ra), (b, rb) = _routing(model), _routing(composed)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(x, y) for x, y in zip(ra, rb))


def test_smoothing_without_calibration_or_after_quantization_is_refused():
    model = tiny_model("olmoe")
    with pytest.raises(ValueError, match="smooth=True needs calibration data"):
        moeq.quantize_model(model, moeq.QuantConfig(group_size=32, smooth=True))
    moeq.quantize_model(model, moeq.QuantConfig(group_size=32))
    with pytest.raises(ValueError, match="already quantized"):
        smooth_model(model, adapter_for(model), CALIB)
    with pytest.raises(ValueError, match="aggregation must be one of"):
        smooth_model(tiny_model("olmoe"), adapter_for(model), CALIB, aggregation="mean")


def test_cli_flags_reach_the_config():
    from moeq.cli import build_parser
    from moeq.cli_flags import quant_config as _quant_config

    args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--smooth", "--smooth-alpha", "0.3",
                                      "--smooth-aggregation", "router_prob", "--expert-token-budget", "64"])
    cfg = _quant_config(args)
    assert (cfg.smooth, cfg.smooth_alpha, cfg.smooth_aggregation, cfg.expert_token_budget) == (True, 0.3, "router_prob", 64)
