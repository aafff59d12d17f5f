"""QuantConfig / WeightSpec validation, overrides and serialization."""

import pytest
import torch

from moeq.config import QuantConfig, WeightSpec


def test_roundtrip_through_dict():
    c = QuantConfig(bits=3, group_size=64, sym=False, overrides={"m.experts.down": {"bits": 8}})
    assert QuantConfig.from_dict({**c.to_dict(), "quant_method": "moeq", "modules": {}}) == c


def test_override_targets_module_then_projection():
    c = QuantConfig(bits=4, overrides={"a.experts": {"bits": 8}, "a.experts.down": {"group_size": 32}})
    assert c.spec_for("a.experts", "gate_up") == WeightSpec(8, 128, True)
    assert c.spec_for("a.experts", "down") == WeightSpec(8, 32, True)
    assert c.spec_for("b.experts", "down") == WeightSpec(4, 128, True)


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 5}, "bits=5"),
    ({"group_size": 0}, "group_size"),
    ({"scale_dtype": "float32"}, "scale_dtype"),
    ({"overrides": {"x": {"bitz": 4}}}, "unknown keys"),
    ({"overrides": {"x": {"bits": 7}}}, "bits=7"),
    ({"clip_max_shrink": 1.5}, "clip_max_shrink"),
])
def test_bad_configs_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


def test_scale_dtype_auto_follows_16bit_models():
    c = QuantConfig()
    assert c.resolve_scale_dtype(torch.float16) == torch.float16
    assert c.resolve_scale_dtype(torch.float32) == torch.bfloat16
    assert QuantConfig(scale_dtype="float16").resolve_scale_dtype(torch.bfloat16) == torch.float16


def test_stage_configs_partition_the_fields_and_compose():
    """QuantConfig = method + the stage configs: every other field belongs to exactly one stage, a stage's
    view round-trips through compose, and the CLI puts each flag in the group of the stage owning its field."""
    import dataclasses

    from moeq.cli_flags import QUANT_FLAGS
    from moeq.stage_configs import STAGE_CONFIGS, SmoothingConfig, WeightsConfig

    owner = {}
    for name, cls in STAGE_CONFIGS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in owner, f"{f.name} in two stages"
            owner[f.name] = name
            assert f.default == getattr(QuantConfig(), f.name) if f.default is not dataclasses.MISSING else True
    assert set(owner) | {"method"} == {f.name for f in dataclasses.fields(QuantConfig)}
    c = QuantConfig(method="agq", bits=3, smooth=True, smooth_alpha=0.25, act_bits=8, router_bits=8)
    assert QuantConfig.compose(c.method, **{n: c.stage(n) for n in STAGE_CONFIGS}) == c
    built = QuantConfig.compose("gptq", weights=WeightsConfig(bits=3), smoothing=SmoothingConfig(smooth=True))
    assert (built.method, built.bits, built.smooth, built.group_size) == ("gptq", 3, True, 128)
    with pytest.raises(ValueError, match="unknown stage"):
        QuantConfig.compose(rotate=None)
    for flag in QUANT_FLAGS:
        if flag.field and flag.field != "method":
            assert flag.group == owner[flag.field], flag.flag
